"""The QEMU guest used by tests/test_qemu.py (see guest.py)."""
