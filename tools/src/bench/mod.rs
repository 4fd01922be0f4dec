//! The benchmark harness behind `kvdex bench …`. Every benchmark prints a table, or one JSON
//! object per line with `--json`, and runs its baseline side by side in the same run.

mod child;
pub mod decode;
pub mod decode_data;
pub mod recall;
pub mod rtt;
pub mod transfer;
