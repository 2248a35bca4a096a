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
