//! `vedfolnir-sessions import-legacy`: the CLI side of [`vedfolnir_sessions::legacy`]
//! (arguments, progress bar, summary).

use clap::Args;

use super::{Failure, Output};
use vedfolnir_sessions::config::Config;
use vedfolnir_sessions::store::SessionStore;

/// `import-legacy` arguments.
#[derive(Debug, Args)]
pub struct ImportLegacyArgs {
    /// Count what would be imported; write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Imports the legacy sessions of the configured namespace and returns the
/// summary JSON.
pub async fn run(args: ImportLegacyArgs, config: Config) -> Result<Output, Failure> {
    let store = SessionStore::connect(&config).await?;
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "import-legacy {bar:40} {pos}/{len} sessions ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let summary = vedfolnir_sessions::legacy::import_legacy(&store, args.dry_run, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .await?;
    bar.finish_and_clear();
    Ok(Output::Json(serde_json::to_value(&summary).map_err(
        |e| Failure {
            code: 2,
            message: e.to_string(),
        },
    )?))
}
