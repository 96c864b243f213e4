# A QEMU guest booted inside a sandboxed build (tests/test_builders.py): the
# builder is /bin/sh (Debian's, bound into the sandbox with /usr, /lib, /lib64),
# which runs ARGV (JSON: strace ... qemu-system-x86_64 ...) in $out/strace and
# keeps the serial console in $out/console.log and the exit status in $out/status.
#
#   nix-build qemu-guest.nix --argstr nonce N --argstr argv '["strace", ...]'
{ nonce, argv }:
derivation {
  name = "noatimefs-qemu-guest-${nonce}";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [
    "-c"
    ''
      mkdir -p "$out/strace" && cd "$out/strace" || exit 1
      "$@" >"$out/console.log" 2>&1
      echo $? >"$out/status"
    ''
    "sh"
  ] ++ builtins.fromJSON argv;
  PATH = "/usr/bin:/bin";
  inherit nonce;
}
