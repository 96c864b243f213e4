/*
 * noatimefs._replyflags: open-reply flags pyfuse3 cannot set.
 *
 * pyfuse3 (3.5) answers OPENDIR with fuse_reply_open() on a fuse_file_info
 * whose only field it sets is fh: it has no way to ask the kernel to cache a
 * directory's listing (FOPEN_CACHE_DIR) or to keep that cache across opens
 * (FOPEN_KEEP_CACHE).  Without them every `ls` of a store's top level goes to
 * the daemon as READDIRPLUS, entry by entry.
 *
 * This module defines fuse_reply_open() itself.  Loaded with RTLD_GLOBAL
 * before pyfuse3 first answers an open (noatimefs/replyflags.py does that),
 * it comes before libfuse in the symbol lookup of pyfuse3's extension, so
 * pyfuse3's calls land here.  A file handle carrying the bits below is
 * passed on with those bits turned into the fuse_file_info flags and cleared
 * from fh; any other reply is passed on untouched to libfuse's own function.
 * The daemon decides the flags (noatimefs.fs, opendir); this only carries
 * them.  If this module is not loaded, the bits reach the kernel as part of
 * fh and come back unchanged in READDIR, where the daemon masks them: the
 * only loss is the kernel's cache.
 *
 * A Python extension only so that setuptools builds and installs it with the
 * package; it defines no Python functions besides applied().
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>  /* first, as Python asks; it defines _GNU_SOURCE for dlvsym */

#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define FUSE_USE_VERSION 35
#include <fuse3/fuse_lowlevel.h>

/* Keep in step with noatimefs/replyflags.py. */
#define NOATIMEFS_CACHE_DIR (UINT64_C(1) << 63)
#define NOATIMEFS_KEEP_CACHE (UINT64_C(1) << 62)
#define NOATIMEFS_FLAGS (NOATIMEFS_CACHE_DIR | NOATIMEFS_KEEP_CACHE)

typedef int (*reply_open_fn)(fuse_req_t, const struct fuse_file_info *);

static reply_open_fn libfuse_reply_open;
static unsigned long long applied;

static reply_open_fn find_libfuse_reply_open(void)
{
	void *lib = dlopen("libfuse3.so.3", RTLD_LAZY | RTLD_NOLOAD);

	if (lib == NULL)
		return NULL;
	return (reply_open_fn)dlvsym(lib, "fuse_reply_open", "FUSE_3.0");
}

__attribute__((visibility("default")))
int fuse_reply_open(fuse_req_t req, const struct fuse_file_info *fi)
{
	struct fuse_file_info flagged;

	if (libfuse_reply_open == NULL)
		libfuse_reply_open = find_libfuse_reply_open();
	if (libfuse_reply_open == NULL) {
		/* Cannot happen: the caller is pyfuse3, which libfuse came with. */
		fputs("noatimefs._replyflags: libfuse3's fuse_reply_open not found\n", stderr);
		abort();
	}
	if ((fi->fh & NOATIMEFS_FLAGS) == 0)
		return libfuse_reply_open(req, fi);

	flagged = *fi;
	flagged.cache_readdir = (fi->fh & NOATIMEFS_CACHE_DIR) != 0;
	flagged.keep_cache = (fi->fh & NOATIMEFS_KEEP_CACHE) != 0;
	flagged.fh = fi->fh & ~NOATIMEFS_FLAGS;
	__atomic_add_fetch(&applied, 1, __ATOMIC_RELAXED);
	return libfuse_reply_open(req, &flagged);
}

static PyObject *replyflags_applied(PyObject *self, PyObject *unused)
{
	return PyLong_FromUnsignedLongLong(__atomic_load_n(&applied, __ATOMIC_RELAXED));
}

static PyMethodDef methods[] = {
	{"applied", replyflags_applied, METH_NOARGS,
	 "How many open replies carried flags set here."},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_replyflags",
	"fuse_reply_open() that carries FOPEN_CACHE_DIR/FOPEN_KEEP_CACHE from fh bits.",
	-1, methods,
};

PyMODINIT_FUNC PyInit__replyflags(void)
{
	return PyModule_Create(&module);
}
