pub mod db;
pub mod pgbouncer;
pub mod raw_http;
pub mod relay;
pub mod tools;
