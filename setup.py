"""Only the C part of the build; everything else is in setup.cfg.

``noatimefs._replyflags`` lets the kernel cache directory listings, and
``noatimefs._syscalls`` makes two system calls without ctypes (see the comment
at the top of each source). Both are optional: if one cannot be built, the
install goes on and the daemon runs without the kernel's listing cache, or
makes those calls through ctypes.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "noatimefs._replyflags",
            sources=["noatimefs/_replyflags.c"],
            define_macros=[("_FILE_OFFSET_BITS", "64")],
            libraries=["dl"],
            optional=True,
        ),
        Extension(
            "noatimefs._syscalls",
            sources=["noatimefs/_syscalls.c"],
            optional=True,
        ),
    ]
)
