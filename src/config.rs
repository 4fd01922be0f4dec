//! Configuration: the embedded default (config/kvdex.toml), then a file, then `KVDEX_*`
//! environment variables, then flags. Bad values are refused at start-up, naming the key.

