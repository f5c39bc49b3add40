pub mod db;
pub mod pgbouncer;
pub mod relay;
pub mod tools;
