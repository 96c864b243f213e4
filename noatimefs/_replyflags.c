/*
 * noatimefs._replyflags: reply fields pyfuse3 cannot set (open flags, bare entries).
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
 * It also defines fuse_add_direntry_plus(), which pyfuse3 calls for every
 * entry of a READDIRPLUS reply, so that an entry can be sent *bare*: with
 * node id 0, which the kernel takes as "no attributes for this one" (its
 * fuse_direntplus_link links nothing; the name, type and d_ino still reach
 * the caller, and a later stat is a LOOKUP).  pyfuse3 cannot send node id 0
 * with a name: an entry whose generation is NOATIMEFS_BARE is passed on with
 * node id and generation 0; d_ino and the type come from its attributes, as
 * libfuse takes them.  Every call is counted, so that the daemon can tell
 * this function is the one pyfuse3 calls before it marks any entry
 * (noatimefs/listing.py, "Bare entries"): a marked entry reaching libfuse's
 * own function would name a node the daemon never made.
 *
 * A Python extension only so that setuptools builds and installs it with the
 * package; it defines no Python functions besides applied() and entries().
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
/* Keep in step with noatimefs/listing.py (BARE): no generation the daemon gives. */
#define NOATIMEFS_BARE (UINT64_C(1) << 63)

typedef int (*reply_open_fn)(fuse_req_t, const struct fuse_file_info *);
typedef size_t (*add_direntry_plus_fn)(fuse_req_t, char *, size_t, const char *,
				       const struct fuse_entry_param *, off_t);

static reply_open_fn libfuse_reply_open;
static add_direntry_plus_fn libfuse_add_direntry_plus;
static unsigned long long applied;
static unsigned long long entries;

/* libfuse3's own definition of *name*; aborts if there is none (the caller is
 * pyfuse3, which libfuse came with: that cannot happen). */
static void *libfuse(const char *name)
{
	void *lib = dlopen("libfuse3.so.3", RTLD_LAZY | RTLD_NOLOAD);
	void *fn = lib == NULL ? NULL : dlvsym(lib, name, "FUSE_3.0");

	if (fn == NULL) {
		fprintf(stderr, "noatimefs._replyflags: libfuse3's %s not found\n", name);
		abort();
	}
	return fn;
}

__attribute__((visibility("default")))
int fuse_reply_open(fuse_req_t req, const struct fuse_file_info *fi)
{
	struct fuse_file_info flagged;

	if (libfuse_reply_open == NULL)
		libfuse_reply_open = (reply_open_fn)libfuse("fuse_reply_open");
	if ((fi->fh & NOATIMEFS_FLAGS) == 0)
		return libfuse_reply_open(req, fi);

	flagged = *fi;
	flagged.cache_readdir = (fi->fh & NOATIMEFS_CACHE_DIR) != 0;
	flagged.keep_cache = (fi->fh & NOATIMEFS_KEEP_CACHE) != 0;
	flagged.fh = fi->fh & ~NOATIMEFS_FLAGS;
	__atomic_add_fetch(&applied, 1, __ATOMIC_RELAXED);
	return libfuse_reply_open(req, &flagged);
}

__attribute__((visibility("default")))
size_t fuse_add_direntry_plus(fuse_req_t req, char *buf, size_t bufsize, const char *name,
			      const struct fuse_entry_param *e, off_t off)
{
	struct fuse_entry_param bare;

	if (libfuse_add_direntry_plus == NULL)
		libfuse_add_direntry_plus = (add_direntry_plus_fn)libfuse("fuse_add_direntry_plus");
	__atomic_add_fetch(&entries, 1, __ATOMIC_RELAXED);
	if (e->generation != NOATIMEFS_BARE)
		return libfuse_add_direntry_plus(req, buf, bufsize, name, e, off);

	bare = *e;
	bare.ino = 0;
	bare.generation = 0;
	return libfuse_add_direntry_plus(req, buf, bufsize, name, &bare, off);
}

static PyObject *replyflags_applied(PyObject *self, PyObject *unused)
{
	return PyLong_FromUnsignedLongLong(__atomic_load_n(&applied, __ATOMIC_RELAXED));
}

static PyObject *replyflags_entries(PyObject *self, PyObject *unused)
{
	return PyLong_FromUnsignedLongLong(__atomic_load_n(&entries, __ATOMIC_RELAXED));
}

static PyMethodDef methods[] = {
	{"applied", replyflags_applied, METH_NOARGS,
	 "How many open replies carried flags set here."},
	{"entries", replyflags_entries, METH_NOARGS,
	 "How many readdirplus entries were added here."},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_replyflags",
	"fuse_reply_open() that carries FOPEN_CACHE_DIR/FOPEN_KEEP_CACHE from fh bits, "
	"and fuse_add_direntry_plus() that sends bare entries.",
	-1, methods,
};

PyMODINIT_FUNC PyInit__replyflags(void)
{
	return PyModule_Create(&module);
}
