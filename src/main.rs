//! The `dsplane` command.
fn main() {}
