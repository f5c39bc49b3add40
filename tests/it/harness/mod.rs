pub mod db;
pub mod relay;
