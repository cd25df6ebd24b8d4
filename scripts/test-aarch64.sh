#!/usr/bin/env bash
# The CPU kernels' NEON path, tested on an x86-64 machine under QEMU's user-mode emulation.
#
#   scripts/test-aarch64.sh [CRATE ...]     (default: step3-nn step3-mfa)
#
# Needs the Rust target and a cross linker, once (Debian):
#   rustup target add aarch64-unknown-linux-gnu
#   apt-get install qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross
# The kernel tests run every path the (emulated) CPU has, NEON and the scalar loop, against f64
# and row by row against the batch. Emulation says nothing about speed.
# Skipped: norm's `bf16_rounds_like_the_reference`. candle 0.11's NEON bf16 element-wise ops
# (candle-core src/cpu/neon.rs, vec_mul_bf16 and its siblings) narrow f32 to bf16 by truncation
# (`vshrn_n_u32::<16>`), not round-to-nearest-even, so bf16 compute on aarch64 differs from the
# reference by up to one bf16 ulp per element-wise op; that test catches it. f32 is unaffected.
set -euo pipefail

crates=("$@")
[[ ${#crates[@]} -gt 0 ]] || crates=(step3-nn step3-mfa)
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
args=()
for c in "${crates[@]}"; do args+=(-p "$c"); done
exec cargo test --locked --target aarch64-unknown-linux-gnu "${args[@]}" -- --skip bf16_rounds_like_the_reference
