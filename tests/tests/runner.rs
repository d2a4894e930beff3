//! `make test`'s runner (scripts/test.sh) refuses a `TEST_JOBS` it cannot run with, before it
//! builds anything, and says what it wants.

use std::process::Command;

#[test]
fn a_test_jobs_that_is_not_a_whole_number_of_at_least_one_is_refused_with_what_it_must_be() {
    let script = stagecoach_e2e::workspace_dir().join("scripts/test.sh");
    for bad in ["0", "x", "-1", "2.5", "1 2"] {
        let out = Command::new("bash")
            .arg(&script)
            .env("TEST_JOBS", bad)
            // A cargo that fails: the refusal must come before any build.
            .env("CARGO", "false")
            .output()
            .expect("run bash");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "TEST_JOBS={bad:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "TEST_JOBS must be a whole number of at least 1, not '{bad}'"
            )),
            "TEST_JOBS={bad:?}: {stderr}"
        );
    }
}
