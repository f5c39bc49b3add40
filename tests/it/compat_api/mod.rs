//! The previous event bus's endpoints, end to end: publish, subscribe, history, replays and
//! the pending status, with a real relay delivering to a real receiver.

use reqwest::Method;
use serde_json::{Value, json};

use crate::admin_api::{Api, TOKEN};
use crate::harness::db::TestDb;
use crate::harness::relay::*;
use testkit::receiver::{Receiver, Reply};

mod flows;
mod input;
