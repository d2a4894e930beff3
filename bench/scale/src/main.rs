//! `stagecoach-bench`: simulated ranks against a coordinator (see the library's docs).

use clap::Parser;

fn main() -> anyhow::Result<()> {
    stagecoach_bench::run(stagecoach_bench::Options::parse())?;
    Ok(())
}
