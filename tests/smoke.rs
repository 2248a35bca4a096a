mod common;
use common::*;

#[tokio::test]
async fn routes_to_live_color_and_flips() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&service("api", &[blue.addr], &[green.addr], "")).await;
    assert_eq!(p.get("/x").await, (200, "blue\n".to_string()));
    let (s, v) = p.flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(p.get("/x").await, (200, "green\n".to_string()));
    p.stop().await;
}
