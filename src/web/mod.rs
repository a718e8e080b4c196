//! Web integration (feature `web`): the tower layer and axum extractor, and
//! the tower-sessions adapter.
