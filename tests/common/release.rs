//! Releases in the end-to-end tests: the plan most of them run and the calls around it.

use serde_json::{json, Value};

use super::{admin_get, admin_post, TestProxy, TOKEN};

/// `GET /api/releases` of `p`.
pub async fn releases(p: &TestProxy) -> Value {
    admin_get(p.admin, "/api/releases").await.1
}

/// Two phases: `backend` (`api`) then `frontend` (`panel`), automatic gates.
pub fn two_phases(bake1: &str, bake2: &str, validate: &str) -> Value {
    json!({
        "name": "feature release",
        "validate": validate,
        "phases": [
            { "name": "backend", "services": ["api"], "bake": bake1 },
            { "name": "frontend", "services": ["panel"], "bake": bake2 },
        ]
    })
}

/// Starts a release on `p` from `plan`; it must be accepted. The answer.
pub async fn start_release(p: &TestProxy, plan: Value) -> Value {
    let (s, v) = admin_post(p.admin, "/api/releases", Some(TOKEN), Some(plan)).await;
    assert_eq!(s, 200, "{v}");
    v
}

/// Sleeps until `before` ahead of the end of `p`'s current validate window (by its
/// `validate_ends_at`), so a fault set next lands just before the release completes however
/// late the test saw it validating. Fails when the window is already that close to its end.
pub async fn until_validation_ends_in(p: &TestProxy, before: std::time::Duration) {
    let all = releases(p).await;
    let ends = all["current"]["validate_ends_at"].as_str().unwrap_or("");
    let ends = humantime::parse_rfc3339(ends).unwrap_or_else(|e| panic!("{e}: {all}"));
    let left = ends
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(
        left > before,
        "the window ends in {left:?}, sooner than the {before:?} the test needs: {all}"
    );
    tokio::time::sleep(left - before).await;
}
