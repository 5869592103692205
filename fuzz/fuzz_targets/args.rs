//! Feed arbitrary argument vectors to the command-line parser the binary
//! uses (`cli::parse`: the colon-form rewrite, then clap), and every
//! argument to the value parsers that run after it (`--since` ages and
//! dates, `config --set KEY=VALUE`, sizes). Arguments are split on NUL bytes
//! and need not be UTF-8. Any panic is a bug; errors are the expected
//! outcome.
#![no_main]

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

use claude_max_market::{cli, config, timespec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut argv = vec![OsString::from("claude-max-market")];
    argv.extend(data.split(|b| *b == 0).take(64).map(|a| OsString::from_vec(a.to_vec())));
    for a in &argv[1..] {
        if let Some(s) = a.to_str() {
            let _ = timespec::parse_since(s, chrono::Utc::now());
            let _ = config::parse_assignment(s);
            let _ = config::parse_size(s);
        }
    }
    let _ = cli::parse(argv);
});
