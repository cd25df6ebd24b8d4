//! The `step3` command line's library part: the golden-fixture checker behind `step3 verify`
//! ([`verify`]), shared by the binary and the end-to-end tests. The argument groups the binary and
//! the chat example share are the facade's `cli` feature (`step3::cli`), so that the chat example
//! builds without the server and the benchmarks.

pub mod verify;
