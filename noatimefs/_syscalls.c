/*
 * noatimefs._syscalls: openat2(2) and name_to_handle_at(2) as plain calls.
 *
 * Python 3.11 has neither.  noatimefs.source calls them through ctypes, which
 * costs about 1.3 us (openat2) and 2.5 us (name_to_handle_at, with copying the
 * handle out) more per call than the system calls themselves, and the daemon
 * makes them on nearly every request: a lookup, an open, a getattr, and for
 * each entry of a listing.  This module makes the same calls with the same
 * arguments; noatimefs.source uses it when it is built and ctypes otherwise,
 * so nothing depends on it (tests/test_syscalls.py checks that both agree).
 *
 * Both release the GIL around the system call (a cold one reads the disk) and
 * report failure as minus the error number instead of raising: the callers
 * decide what an error means.  A path or name with a NUL byte is refused
 * (ValueError); FUSE never sends one.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first, as Python asks; it defines _GNU_SOURCE */

#include <errno.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_openat2
#define SYS_openat2 437 /* the same number on every architecture (asm-generic) */
#endif

/* openat2(dirfd, path, flags, resolve) -> the descriptor, or -errno.
 * O_CLOEXEC is always added: the daemon passes no descriptor on. */
static PyObject *syscalls_openat2(PyObject *self, PyObject *args)
{
	int dirfd;
	const char *path;
	unsigned long long flags, resolve;
	struct open_how how = {0};
	long fd;
	int err = 0;

	if (!PyArg_ParseTuple(args, "iyKK", &dirfd, &path, &flags, &resolve))
		return NULL;
	how.flags = flags | O_CLOEXEC;
	how.resolve = resolve;
	Py_BEGIN_ALLOW_THREADS
	fd = syscall(SYS_openat2, dirfd, path, &how, sizeof(how));
	if (fd < 0)
		err = errno;
	Py_END_ALLOW_THREADS
	return PyLong_FromLong(fd >= 0 ? fd : -err);
}

/*
 * name_to_handle(dirfd, name, flags) -> the handle's type (4 bytes, native
 * order) followed by its bytes, or -errno.  The same bytes noatimefs.source
 * takes through ctypes.
 */
static PyObject *syscalls_name_to_handle(PyObject *self, PyObject *args)
{
	int dirfd, flags, mount_id, rc;
	const char *name;
	unsigned char buf[sizeof(struct file_handle) + MAX_HANDLE_SZ]
		__attribute__((aligned(__alignof__(struct file_handle))));
	struct file_handle *fh = (struct file_handle *)buf;
	int err = 0;

	if (!PyArg_ParseTuple(args, "iyi", &dirfd, &name, &flags))
		return NULL;
	fh->handle_bytes = MAX_HANDLE_SZ;
	Py_BEGIN_ALLOW_THREADS
	rc = name_to_handle_at(dirfd, name, fh, &mount_id, flags);
	if (rc != 0)
		err = errno;
	Py_END_ALLOW_THREADS
	if (rc != 0)
		return PyLong_FromLong(-err);
	return PyBytes_FromStringAndSize((const char *)&fh->handle_type,
					 sizeof(fh->handle_type) + fh->handle_bytes);
}

static PyMethodDef methods[] = {
	{"openat2", syscalls_openat2, METH_VARARGS,
	 "openat2(dirfd, path, flags, resolve) -> descriptor, or -errno."},
	{"name_to_handle", syscalls_name_to_handle, METH_VARARGS,
	 "name_to_handle(dirfd, name, flags) -> handle type and bytes, or -errno."},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_syscalls",
	"openat2(2) and name_to_handle_at(2) without ctypes.", -1, methods,
};

PyMODINIT_FUNC PyInit__syscalls(void)
{
	return PyModule_Create(&module);
}
