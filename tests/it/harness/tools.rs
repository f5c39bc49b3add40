//! Outside tools some tests need (`promtool`, `pgbouncer`). A missing tool fails the test:
//! a check that skips itself silently looks exactly like one that passed (libtest hides the
//! output of passing tests). A developer without the tool opts out explicitly with
//! `OUTBOX_ALLOW_MISSING_TOOLS=1`; the skip is then printed straight to stderr.

use std::io::Write;

/// Set to `1` to let tests whose outside tool is missing pass without running it.
pub const ALLOW_MISSING_ENV: &str = "OUTBOX_ALLOW_MISSING_TOOLS";

/// Called when `tool` cannot run: panics (the default) or, when [`ALLOW_MISSING_ENV`] is
/// `1`, prints a loud SKIPPED line and returns, and the caller skips the check.
pub fn missing_tool(tool: &str, test: &str, install: &str, why: &str) {
    if std::env::var(ALLOW_MISSING_ENV).is_ok_and(|v| v == "1") {
        // Straight to the process's stderr: libtest captures eprintln! of passing tests.
        let _ = writeln!(
            std::io::stderr(),
            "\n*** SKIPPED: {tool} not runnable ({why}); {test} did not check it \
             ({ALLOW_MISSING_ENV}=1). Install it: {install} ***\n"
        );
        return;
    }
    panic!(
        "{test}: {tool} is not runnable ({why}). Install it ({install}), \
         or set {ALLOW_MISSING_ENV}=1 to skip what needs it"
    );
}
