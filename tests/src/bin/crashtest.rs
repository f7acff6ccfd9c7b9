//! `confab-crashtest`: kills the real `confab serve` with SIGKILL at random moments while
//! clients write, restarts it and checks that everything acknowledged under the
//! durability contract (docs/durability.md) survived. See `confab_tests::crash`.

use std::path::PathBuf;
use std::process::ExitCode;

use confab_tests::crash::{run, OpKind, Options};

const USAGE: &str =
    "usage: confab-crashtest [--rounds N] [--clients N] [--recipients N] [--seed N] \
[--min-delay MS] [--max-delay MS] [--ops messages,roster,subscriptions,private] [--confab PATH]";

fn parse() -> Result<Options, String> {
    let mut opts = Options::new(confab_tests::confab_bin().to_path_buf());
    opts.seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.to_string());
        }
        let value = args
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| format!("{flag}: not a number: {value}"))
        };
        match flag.as_str() {
            "--rounds" => opts.rounds = number()? as usize,
            "--clients" => opts.clients = number()? as usize,
            "--recipients" => opts.recipients = number()? as usize,
            "--seed" => opts.seed = number()?,
            "--min-delay" => opts.min_delay_ms = number()?,
            "--max-delay" => opts.max_delay_ms = number()?,
            "--confab" => opts.confab = PathBuf::from(&value),
            "--ops" => {
                opts.ops = value
                    .split(',')
                    .map(|k| OpKind::parse(k).ok_or_else(|| format!("--ops: unknown kind {k}")))
                    .collect::<Result<_, _>>()?
            }
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    Ok(opts)
}

fn main() -> ExitCode {
    let opts = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "confab-crashtest: {} rounds, {} senders, {} recipients, operations {:?}, kill after {}-{} ms, seed {} (replay with --seed {}), confab {}",
        opts.rounds,
        opts.clients,
        opts.recipients,
        opts.ops,
        opts.min_delay_ms,
        opts.max_delay_ms,
        opts.seed,
        opts.seed,
        opts.confab.display()
    );
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&opts)) {
        Ok(totals) if totals.ok() => ExitCode::SUCCESS,
        Ok(totals) => {
            eprintln!("FAILED (seed {}):", opts.seed);
            for p in &totals.problems {
                eprintln!("  {p}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("FAILED (seed {}): {e:#}", opts.seed);
            ExitCode::FAILURE
        }
    }
}
