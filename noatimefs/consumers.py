"""Who a consumer is: a uid made into a :class:`noatimefs.policy.Consumer`.

The one place that asks the passwd and group databases, shared by ``--owner``
(:func:`noatimefs.cli.resolve_owner`) and by anything else that presents
SOURCE to a uid.
"""

from __future__ import annotations

import logging
import os
import pwd

from noatimefs import policy

log = logging.getLogger(__name__)


def consumer_for_uid(uid: int) -> policy.Consumer:
    """The consumer *uid*: its passwd entry's primary gid and its groups (``getgrouplist``).

    A uid with no passwd entry gets gid = uid, the convention of systemd's
    ``DynamicUser=`` and Nix's ``auto-allocate-uids`` (whose processes run with
    that gid), and no known group memberships: not even of that gid, which
    :func:`noatimefs.policy.consumer_bits` then treats as unknown either way.
    The gid is only ever the presented group of *public* entries, whose group
    bits equal their other bits, and a namespace root's capabilities need the
    uid mapped too: see :mod:`noatimefs.policy` for why any gid is safe there.
    """
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        log.info("uid %d has no passwd entry: no group memberships assumed, gid %d", uid, uid)
        return policy.Consumer(uid, frozenset(), uid)
    groups = frozenset(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return policy.Consumer(uid, groups, entry.pw_gid)
