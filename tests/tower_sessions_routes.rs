//! tower-sessions' own route tests (`route_tests!`, copied with its MIT
//! notice into `tests/tower_sessions_upstream/`), run against the adapter:
//! the same app and assertions tower-sessions runs against its stores, with
//! the event-sourced store behind `SessionManagerLayer`.
#![allow(clippy::dbg_macro, clippy::unwrap_used)]

mod common;
#[rustfmt::skip]
#[macro_use]
mod tower_sessions_upstream;

use std::sync::Arc;

use axum::Router;
use common::TestContext;
use tower_sessions::session::{Id, Record};
use tower_sessions::{SessionManagerLayer, session_store};
use vedfolnir_sessions::web::TowerSessionsStore;

/// The adapter, holding the test's namespace for as long as tower-sessions
/// holds the store (its keys are removed when the last clone goes).
#[derive(Clone)]
struct Adapter {
    store: TowerSessionsStore,
    _ctx: Arc<TestContext>,
}

impl std::fmt::Debug for Adapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.store.fmt(f)
    }
}

#[async_trait::async_trait]
impl tower_sessions::SessionStore for Adapter {
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        self.store.create(record).await
    }

    async fn save(&self, record: &Record) -> session_store::Result<()> {
        self.store.save(record).await
    }

    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        self.store.load(id).await
    }

    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        self.store.delete(id).await
    }
}

/// The upstream app over the adapter, in a namespace of its own.
async fn app(max_age: Option<cookie::time::Duration>, domain: Option<String>) -> Router {
    let ctx = Arc::new(TestContext::new().await);
    let store = Adapter {
        store: TowerSessionsStore::new(ctx.store.clone()),
        _ctx: ctx,
    };
    let session_manager = SessionManagerLayer::new(store).with_secure(true);
    tower_sessions_upstream::build_app(session_manager, max_age, domain)
}

route_tests!(app);
