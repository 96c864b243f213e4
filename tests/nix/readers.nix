# COUNT derivations whose builder is noatimefs-reader (tests/nix/reader.c, compiled
# static and bound into the sandbox at /noatimefs-reader with --option sandbox-paths).
# No nixpkgs: plain `derivation`. Each has its own name, so Nix builds them at once
# (--max-jobs), each as its own build user; NONCE makes them new for every run.
#
#   nix-build readers.nix --argstr count 6 --argstr nonce N --argstr dir /run/noatimefs/self \
#       [--argstr barrier /barrier] [--argstr timeout 120]
{ count, nonce, dir, barrier ? "", timeout ? "120" }:
builtins.genList
  (i: derivation {
    name = "noatimefs-reader-${toString i}-${nonce}";
    system = builtins.currentSystem;
    builder = "/noatimefs-reader";
    args = [ dir ] ++ (if barrier == "" then [ ] else [ barrier count timeout ]);
    inherit nonce;
  })
  (builtins.fromJSON count)
