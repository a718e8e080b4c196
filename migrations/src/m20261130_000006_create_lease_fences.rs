//! Creates `lease_fences`: one fencing token per `(stream, role)`.
//!
//! A worker that takes the lease of a partition for a role (the audit
//! consumer of a stream) first bumps the partition's token here, in the
//! database, and every transaction it then commits checks that the token is
//! still the one it got. A worker that lost its lease (stopped past it, cut
//! off, or replaced after Redis lost its data) therefore cannot commit: its
//! token is stale as soon as its successor has bumped it. The token lives in
//! the database, not in Redis, so it never goes backwards when Redis loses
//! its data.

use sea_orm_migration::prelude::*;

/// Creates the `lease_fences` table.
#[derive(DeriveMigrationName)]
pub struct Migration;

#[allow(elided_lifetimes_in_paths)]
#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(LeaseFences::Table)
                    .col(ColumnDef::new(LeaseFences::Stream).string().not_null())
                    .col(ColumnDef::new(LeaseFences::Role).string_len(16).not_null())
                    .col(ColumnDef::new(LeaseFences::Token).big_integer().not_null())
                    .col(ColumnDef::new(LeaseFences::Holder).string().null())
                    .col(
                        ColumnDef::new(LeaseFences::UpdatedAt)
                            .timestamp_with_time_zone()
                            .not_null(),
                    )
                    .primary_key(
                        Index::create()
                            .name("pk_lease_fences")
                            .col(LeaseFences::Stream)
                            .col(LeaseFences::Role),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(LeaseFences::Table).to_owned())
            .await
    }

    fn use_transaction(&self) -> Option<bool> {
        Some(true)
    }
}

/// Table and column names of `lease_fences` as this migration created them.
#[derive(DeriveIden)]
enum LeaseFences {
    Table,
    Stream,
    Role,
    Token,
    Holder,
    UpdatedAt,
}
