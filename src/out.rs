//! What the CLI (`ctl`, `check`, `demo`) writes on stdout and stderr, without `println!`'s
//! panic when the reader went away (`switchyard ctl events | head -1`: EPIPE, exit 101).
//!
//! A closed stdout stops the writing: later lines are dropped, the command finishes (or, for a
//! loop like `release status --watch`, stops at [`closed`]) and exits with its own code, 0 on
//! success; a refused action still exits 1. Any other write error (a full disk) is said once on
//! stderr and turns a success into exit 1 ([`exit_code`]). Rust ignores SIGPIPE, so a closed
//! pipe is an EPIPE error here, not a signal.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU8, Ordering};

const OPEN: u8 = 0;
/// The reader went away (EPIPE): nothing more to say, nothing wrong.
const GONE: u8 = 1;
/// Another write error: the output is incomplete.
const FAILED: u8 = 2;

static STDOUT: AtomicU8 = AtomicU8::new(OPEN);

/// `text` with every control character a terminal acts on (ESC sequences that retitle,
/// recolour or clear it, CR that overwrites a line, BEL, DEL, C1) shown escaped (`\u{1b}`);
/// line ends and tabs kept. What the CLI prints can come from remote answers (an upstream's or
/// Prometheus's error text, in events and trigger states).
pub fn terminal_safe(text: &str) -> std::borrow::Cow<'_, str> {
    if !text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Writes to stdout (the [`outln!`](crate::outln) macro); a no-op once stdout is closed.
/// Control characters are shown escaped ([`terminal_safe`]).
pub fn stdout(args: fmt::Arguments<'_>) {
    if STDOUT.load(Ordering::Relaxed) != OPEN {
        return;
    }
    let text = args.to_string();
    let mut out = io::stdout().lock();
    if let Err(e) = out
        .write_all(terminal_safe(&text).as_bytes())
        .and_then(|()| out.flush())
    {
        if e.kind() == io::ErrorKind::BrokenPipe {
            STDOUT.store(GONE, Ordering::Relaxed);
        } else {
            STDOUT.store(FAILED, Ordering::Relaxed);
            let _ = writeln!(io::stderr(), "error: cannot write to stdout: {e}");
        }
    }
}

/// Writes to stderr (the [`errln!`](crate::errln) macro); an error there is dropped, as
/// there is nowhere left to say it. Control characters are shown escaped ([`terminal_safe`]).
pub fn stderr(args: fmt::Arguments<'_>) {
    let text = args.to_string();
    let _ = io::stderr()
        .lock()
        .write_all(terminal_safe(&text).as_bytes());
}

/// One line of a field that came from a remote answer: its line ends shown escaped too, so
/// that it cannot print a line of its own (a forged status line under the real one).
pub fn one_line(text: &str) -> String {
    text.replace('\r', "\\r").replace('\n', "\\n")
}

/// Whether stdout is closed (or failed): a loop that only prints can stop.
pub fn closed() -> bool {
    STDOUT.load(Ordering::Relaxed) != OPEN
}

/// The exit code a command ends with: its own, except that a success whose output could not
/// be written (other than to a reader that went away) is a failure.
pub fn exit_code(code: i32) -> i32 {
    if code == 0 && STDOUT.load(Ordering::Relaxed) == FAILED {
        1
    } else {
        code
    }
}

/// `println!` that stops writing, instead of panicking, when stdout is closed.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::out::stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::out::stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` that stops writing, instead of panicking, when stdout is closed.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::stdout(format_args!($($arg)*))
    };
}

/// `eprintln!` that does not panic when stderr is closed.
#[macro_export]
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::out::stderr(format_args!("{}\n", format_args!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_controls_are_shown_escaped() {
        assert_eq!(terminal_safe("plain\ttext\n"), "plain\ttext\n");
        assert_eq!(
            terminal_safe("a\u{1b}]0;pwned\u{7}b\u{1b}[2Jc\rd\u{9b}e\u{7f}"),
            "a\\u{1b}]0;pwned\\u{7}b\\u{1b}[2Jc\\rd\\u{9b}e\\u{7f}"
        );
        assert_eq!(one_line("x\napi  live: GREEN\r"), "x\\napi  live: GREEN\\r");
    }
}
