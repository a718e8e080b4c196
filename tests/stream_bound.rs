//! The event stream stays bounded where no audit consumer reads it
//! (`SESSION_STREAM_MAXLEN`), and is never trimmed by the store once a
//! consumer group exists, so nothing unaudited is lost.

mod common;

use std::time::Duration;

use common::TestContext;
use redis::AsyncCommands as _;
use vedfolnir_sessions::{Changes, NewSession};

async fn write(ctx: &TestContext, n: usize) {
    for i in 0..n {
        let c = ctx
            .store
            .create(NewSession::anonymous().with("i", i))
            .await
            .expect("create");
        if i % 2 == 0 {
            ctx.store
                .update(&c.session_id, Changes::new().with_set("j", i))
                .await
                .expect("update");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_consumer_group_the_stream_stays_bounded() {
    let ctx = TestContext::with(|c| c.with_stream_maxlen(200)).await;
    write(&ctx, 1_000).await;
    // 1500 events went in; the store trimmed as it wrote (to about 200:
    // approximate trimming removes whole nodes of 100 entries).
    ctx.eventually(
        "the store's own trims to finish",
        Duration::from_secs(5),
        || async { ctx.stream_len().await <= 400 },
    )
    .await;
    ctx.store.trim_stream().await.expect("trim");
    let len = ctx.stream_len().await;
    assert!((200..=300).contains(&len), "{len}");
    // The newest entries are the ones kept.
    let last = ctx.stream().await.pop().expect("an entry");
    assert_eq!(last["type"], "created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_group_that_has_not_read_loses_nothing() {
    let ctx = TestContext::with(|c| c.with_stream_maxlen(200)).await;
    write(&ctx, 20).await;
    let stream = ctx.store.keys().part(0).stream.clone();
    // The audit worker's group, created from the start of the stream; it
    // reads nothing.
    let _: () = ctx
        .conn()
        .xgroup_create_mkstream(&stream, "audit", "0")
        .await
        .expect("XGROUP CREATE");
    write(&ctx, 600).await;
    // The same script the writes run every other event: it sees the group
    // and removes nothing.
    assert_eq!(ctx.store.trim_stream().await.expect("trim"), 0);
    assert_eq!(
        ctx.stream_len().await,
        30 + 900,
        "every unread entry is kept"
    );
    // What the group then reads starts at the first entry ever written.
    let read: redis::streams::StreamReadReply = ctx
        .conn()
        .xread_options(
            &[&stream],
            &[">"],
            &redis::streams::StreamReadOptions::default()
                .group("audit", "c1")
                .count(1),
        )
        .await
        .expect("XREADGROUP");
    let first = &read.keys[0].ids[0];
    assert_eq!(first.get::<String>("seq").as_deref(), Some("1"));
    assert_eq!(first.get::<String>("type").as_deref(), Some("created"));
}

#[tokio::test]
async fn zero_never_trims() {
    let ctx = TestContext::with(|c| c.with_stream_maxlen(0)).await;
    write(&ctx, 300).await;
    assert_eq!(ctx.store.trim_stream().await.expect("trim"), 0);
    assert_eq!(ctx.stream_len().await, 450);
}
