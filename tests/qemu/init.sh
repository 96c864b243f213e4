#!/bin/busybox sh
# /init of the noatimefs test guest (busybox-static, no root file system).
#
# Mounts the 9p share tagged "store" read-only, stacks an overlay on it
# (lowerdir = the 9p mount, upper and work on a tmpfs), exercises it, and
# reports on the console (ttyS0), one line per result:
#
#   CHECK <name> PASS|FAIL <detail>
#   SUM <sha256> <path relative to the store>      (compared by the host)
#   GUEST-DONE                                     (last line, then power off)
#
# Kernel command line parameters it reads:
#   noatimefs.cache=loose|none|...   9p cache mode (default loose)
#   noatimefs.hang=1                 hang before doing anything (tests the
#                                    host's timeout handling)

/bin/busybox mkdir -p /bin /proc /sys /dev /tmp
/bin/busybox --install -s /bin
export PATH=/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# Keep kernel chatter (KERN_WARNING and below) off the console so that it does
# not split our lines; it is dumped with dmesg at the end if a check fails.
echo 4 >/proc/sys/kernel/printk

param() {
    for word in $(cat /proc/cmdline); do
        case "$word" in
            "noatimefs.$1="*) echo "${word#*=}" ;;
        esac
    done
}

FAILED=0
check() {  # check NAME PASS|FAIL DETAIL...
    name=$1 status=$2
    shift 2
    echo "CHECK $name $status $*"
    [ "$status" = PASS ] || FAILED=1
}

finish() {
    if [ "$FAILED" != 0 ]; then
        echo "--- guest dmesg (tail) ---"
        dmesg | tail -n 40
        echo "--- end of guest dmesg ---"
    fi
    echo GUEST-DONE
    sync
    poweroff -f
    sleep 10  # poweroff -f does not return; just in case
    exit 1
}

CACHE=$(param cache)
[ -n "$CACHE" ] || CACHE=loose
echo "GUEST-START kernel=$(uname -r) cache=$CACHE"

if [ "$(param hang)" = 1 ]; then
    echo "GUEST-HANGING (noatimefs.hang=1)"
    while :; do sleep 3600; done
fi

# --- kernel modules, in dependency order (written by the host builder) -------
loaded=0
for mod in $(cat /lib/modules/order); do
    if out=$(insmod "/lib/modules/$mod.ko" 2>&1); then
        loaded=$((loaded + 1))
    else
        check "insmod-$mod" FAIL "$out"
    fi
done
check modules PASS "$loaded loaded"

# --- 9p, read-only ------------------------------------------------------------
L=/mnt/lower R=/mnt/rw M=/mnt/merged
mkdir -p $L $R $M
OPTS="ro,trans=virtio,version=9p2000.L,cache=$CACHE,msize=262144"
if out=$(mount -t 9p -o "$OPTS" store $L 2>&1); then
    check mount-9p PASS "$(grep " $L " /proc/mounts)"
else
    check mount-9p FAIL "$out"
    finish
fi

# --- overlay: lowerdir = the 9p mount, upper/work on tmpfs --------------------
mount -t tmpfs -o mode=0755 tmpfs $R
mkdir -p $R/upper $R/work
if out=$(mount -t overlay overlay -o "lowerdir=$L,upperdir=$R/upper,workdir=$R/work" $M 2>&1)
then
    check mount-overlay PASS "$(grep " $M " /proc/mounts)"
else
    check mount-overlay FAIL "$out"
    finish
fi

# --- read and checksum every file through the overlay -------------------------
# Every open of a lower file here is an overlay open with O_NOATIME.
cd $M || finish
count=0 bad=0
for f in $(find . -type f | sort); do
    if sum=$(sha256sum "$f" 2>/tmp/err); then
        echo "SUM ${sum%% *} ${f#./}"
        count=$((count + 1))
    else
        echo "SUM-ERROR ${f#./} $(cat /tmp/err)"
        bad=$((bad + 1))
    fi
done
cd /
if [ $bad = 0 ] && [ $count -gt 0 ]; then
    check sha256 PASS "$count files"
else
    check sha256 FAIL "$count read, $bad failed"
fi

# --- a symlink in the store reads back as it is on the host ----------------------
out=$(readlink $M/data/link.txt 2>&1)
if [ "$out" = copyme.txt ] && [ "$(cat $M/data/link.txt)" = "$(cat $M/data/copyme.txt)" ]; then
    check symlink PASS "data/link.txt -> $out"
else
    check symlink FAIL "readlink: $out"
fi

# --- execute from the store -----------------------------------------------------
out=$($M/bin/busybox echo exec-ok 2>&1)
if [ "$out" = exec-ok ]; then
    check exec-binary PASS "bin/busybox ran"
else
    check exec-binary FAIL "$out"
fi
out=$($M/bin/hello.sh 2>&1)
if [ "$out" = "hello from the store" ]; then
    check exec-script PASS "bin/hello.sh ran"
else
    check exec-script FAIL "$out"
fi

# --- the lower layer is read-only -------------------------------------------------
if out=$(touch $L/new-file 2>&1); then
    check lower-readonly FAIL "created $L/new-file"
else
    check lower-readonly PASS "$out"
fi

# --- copy-up: append to a store file through the overlay -------------------------
F=data/copyme.txt
before=$(sha256sum $L/$F | cut -d' ' -f1)
if out=$(echo "appended in the guest" 2>&1 >>$M/$F); then
    expect=$( (cat $L/$F; echo "appended in the guest") | sha256sum | cut -d' ' -f1)
    merged=$(sha256sum $M/$F | cut -d' ' -f1)
    upper=$(sha256sum $R/upper/$F 2>/dev/null | cut -d' ' -f1)
    after=$(sha256sum $L/$F | cut -d' ' -f1)
    if [ "$merged" = "$expect" ] && [ "$upper" = "$expect" ] && [ "$after" = "$before" ]; then
        check copy-up PASS "$F copied up, lower unchanged"
    else
        check copy-up FAIL "merged=$merged upper=$upper expect=$expect lower $before->$after"
    fi
else
    check copy-up FAIL "$out"
fi

# --- whiteout: delete a store file through the overlay ---------------------------
if rm $M/data/deleteme.txt && [ ! -e $M/data/deleteme.txt ] && [ -f $L/data/deleteme.txt ]; then
    check whiteout PASS "gone from overlay, kept in lower"
else
    check whiteout FAIL "$(ls -l $M/data $L/data 2>&1 | tr '\n' ' ')"
fi

if out=$(umount $M 2>&1 && umount $L 2>&1); then
    check umount PASS "overlay and 9p unmounted"
else
    check umount FAIL "$out"
fi
finish
