//! The relay library: sans-IO engine, runtime and I/O backends.
