"""Only the C part of the build; everything else is in setup.cfg.

``noatimefs._replyflags`` lets the kernel cache directory listings (see the
comment at the top of its source). It is optional: if it cannot be built, the
install goes on and the daemon runs without the kernel's listing cache.
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
        )
    ]
)
