//! Shipping: the static binary, scripts/install, the conf samples, the man
//! pages and the bash completion, each checked against the tables in the
//! code (config::KEYS, cli::COMMANDS, ADM_OPTIONS, OPTION_DOCS) so that the
//! documentation cannot drift from the parser.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use clup::cli::{ADM_OPTIONS, COMMANDS, EXTRA_COMMANDS, OPTION_DOCS};
use clup::model::config::{Config, KEYS};

use crate::util::{Out, BIN};

const MAN_PAGES: &[&str] = &[
    "man/clupserver.8",
    "man/clupadm.8",
    "man/cstlb.8",
    "man/clup.conf.5",
    "man/clup-init.json.5",
];

const STATIC_BIN: &str = "target/x86_64-unknown-linux-musl/release/clup";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// A fresh directory under the temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("clup-ship-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> Out {
    cmd.env_remove("CLUP_HOME")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
        .into()
}

/// Roff text with `\-` as plain `-`, so option spellings can be searched.
fn plain_roff(text: &str) -> String {
    text.replace("\\-", "-")
}

/// `word` occurs in `text` not as part of a longer option or name.
fn has_word(text: &str, word: &str) -> bool {
    let part = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(part) && !after.is_some_and(part)
    })
}

/// Every spelling (short and long) of each option a command accepts.
fn spellings(opts: &[&str]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for o in opts {
        let (c, long, ..) = OPTION_DOCS
            .iter()
            .find(|(c, ..)| c == o)
            .unwrap_or_else(|| panic!("{o} not in OPTION_DOCS"));
        out.insert(c.to_string());
        if !long.is_empty() {
            out.insert(long.to_string());
        }
    }
    out
}

#[test]
fn man_pages_render_without_warnings() {
    let probe = Command::new("groff").arg("--version").output();
    assert!(
        probe.is_ok_and(|o| o.status.success()),
        "groff is missing: install it (apt-get install groff; scripts/test does) to check the man pages"
    );
    for page in MAN_PAGES {
        let out = run(Command::new("groff")
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(repo().join(page)));
        assert_eq!(out.code, 0, "groff failed on {page}: {}", out.stderr);
        assert!(
            out.stderr.is_empty(),
            "groff warns about {page}:\n{}",
            out.stderr
        );
        let text = read(page);
        assert!(text.starts_with(".TH "), "{page} has no .TH line first");
        for section in [".SH NAME", ".SH DESCRIPTION", ".SH SEE ALSO"] {
            assert!(text.contains(section), "{page} lacks {section}");
        }
    }
}

#[test]
fn clup_conf_5_documents_every_key_with_its_default() {
    let page = read("man/clup.conf.5");
    for k in KEYS {
        let head = format!("\\fB{}\\fR (", k.name);
        let line = page
            .lines()
            .find(|l| l.starts_with(&head))
            .unwrap_or_else(|| panic!("clup.conf.5 does not document key {}", k.name));
        let want = match k.default {
            None => "required".to_string(),
            Some("") => "default empty".to_string(),
            Some(d) => format!("default \\fB{}\\fR", d.replace('-', "\\-")),
        };
        assert!(
            line.contains(&want),
            "clup.conf.5: key {} should say '{want}': {line}",
            k.name
        );
    }
}

#[test]
fn clupadm_8_documents_every_command_option_and_exit_code() {
    let page = plain_roff(&read("man/clupadm.8"));
    for (cmd, _) in COMMANDS.iter().chain(EXTRA_COMMANDS) {
        assert!(
            page.lines()
                .any(|l| l.starts_with(&format!(".B {cmd} ")) || l == format!(".B {cmd}")),
            "clupadm.8 has no entry for command {cmd}"
        );
    }
    let used: Vec<&str> = ADM_OPTIONS
        .iter()
        .flat_map(|(_, o)| o.iter().copied())
        .collect();
    for o in spellings(&used) {
        assert!(has_word(&page, &o), "clupadm.8 does not mention option {o}");
    }
    for code in ["0", "1", "2", "3"] {
        assert!(
            page.contains(&format!(".TP\n.B {code}\n")),
            "clupadm.8 does not document exit status {code}"
        );
    }
    for other in ["clupserver.8", "cstlb.8"] {
        let p = read(&format!("man/{other}"));
        for must in ["SIGTERM", "CLUP_HOME", ".SH EXIT STATUS"] {
            if other == "cstlb.8" && must == "CLUP_HOME" {
                continue;
            }
            assert!(p.contains(must), "{other} lacks {must}");
        }
    }
    let server = plain_roff(&read("man/clupserver.8"));
    for must in [
        "SIGHUP",
        "logs/clupserver.log",
        "run/clupserver.pid",
        "data/meta.json",
        "data/tasks/N.log",
        "data/events.json",
        "GET /events",
        "CLUP_OLD_PRIMARY",
        "get_lb_host",
        "X-Clup-Token",
        "X-Clup-Pass",
        "/health",
        "/api/status",
        "401",
        "404",
        "413",
    ] {
        assert!(server.contains(must), "clupserver.8 lacks {must}");
    }
}

#[test]
fn bash_completion_agrees_with_adm_options() {
    let text = read("conf/clupadm.bash-completion");
    let commands: BTreeSet<&str> = text
        .lines()
        .find_map(|l| l.strip_prefix("_clupadm_commands=\""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("_clupadm_commands=\"...\" line")
        .split_whitespace()
        .collect();
    let want: BTreeSet<&str> = COMMANDS
        .iter()
        .chain(EXTRA_COMMANDS)
        .map(|(c, _)| *c)
        .collect();
    assert_eq!(commands, want, "completion commands differ from COMMANDS");
    for (cmd, opts) in ADM_OPTIONS {
        let prefix = format!("{cmd}) echo \"");
        let listed: BTreeSet<String> = text
            .lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|l| l.strip_suffix("\" ;;"))
            .unwrap_or_else(|| panic!("completion has no options line for {cmd}"))
            .split_whitespace()
            .map(str::to_string)
            .collect();
        assert_eq!(listed, spellings(opts), "completion options of {cmd}");
    }
    if let Ok(o) = Command::new("bash")
        .arg("-n")
        .arg(repo().join("conf/clupadm.bash-completion"))
        .output()
    {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn conf_samples_parse_with_the_real_parsers() {
    let text = read("conf/clup.conf");
    let path = repo().join("conf/clup.conf");
    Config::parse(&text, &path).unwrap_or_else(|e| panic!("{e}"));
    // Every key is there: set, or commented out at its default.
    for k in KEYS {
        let set = text.lines().any(|l| {
            l.split_once('=')
                .is_some_and(|(key, _)| key.trim() == k.name && !l.starts_with('#'))
        });
        let commented = k.default.is_some_and(|d| {
            text.lines().any(|l| {
                l.strip_prefix('#')
                    .and_then(|l| l.split_once('='))
                    .is_some_and(|(key, v)| key.trim() == k.name && v.trim() == d)
            })
        });
        assert!(
            set || commented,
            "conf/clup.conf: key {} is neither set nor commented at its default",
            k.name
        );
    }
    let init = clup::model::meta::parse_clusters(&read("conf/init.json"))
        .unwrap_or_else(|e| panic!("{e}"));
    let manual = clup::model::meta::parse_clusters(include_str!("data/manual_init.json")).unwrap();
    assert_eq!(init, manual, "conf/init.json is not the manual's example");

    let unit = read("conf/clupserver.service");
    for must in [
        "ExecStart=/opt/clup/bin/clupserver start -f",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=70",
    ] {
        assert!(
            unit.lines().any(|l| l == must),
            "clupserver.service lacks {must}"
        );
    }
    let lb = read("conf/cstlb@.service");
    assert!(lb.contains("EnvironmentFile=/opt/clup/conf/cstlb-%i.env"));
    assert!(lb.contains("ExecStart=/opt/clup/bin/cstlb "));
    let env = read("conf/cstlb-cluster01.env");
    for v in ["CSTLB_TOKEN=", "CLUP_URL=", "CSTLB_MGR_TOKEN="] {
        assert!(env.lines().any(|l| l.starts_with(v)), "cstlb env lacks {v}");
    }
}

#[test]
fn install_twice_keeps_edited_conf_and_data() {
    let tmp = TempDir::new("install");
    let prefix = tmp.0.join("opt/clup");
    let install = || {
        run(Command::new(repo().join("scripts/install"))
            .arg("--bin")
            .arg(BIN)
            .arg(&prefix))
    };
    let first = install();
    assert_eq!(first.code, 0, "{}{}", first.stdout, first.stderr);
    for rel in [
        "bin/clup",
        "conf/clup.conf",
        "conf/init.json",
        "logs",
        "data",
        "run",
        "man/man5/clup.conf.5",
        "man/man5/clup-init.json.5",
        "man/man8/clupserver.8",
        "man/man8/clupadm.8",
        "man/man8/cstlb.8",
    ] {
        assert!(prefix.join(rel).exists(), "install did not create {rel}");
    }
    for name in ["clupserver", "clupadm", "cstlb"] {
        let link = std::fs::read_link(prefix.join("bin").join(name)).unwrap();
        assert_eq!(link, Path::new("clup"), "bin/{name}");
    }

    let conf = prefix.join("conf/clup.conf");
    let edited = format!(
        "{}\nprobe_interval_note = edited\n",
        std::fs::read_to_string(&conf).unwrap()
    );
    std::fs::write(&conf, &edited).unwrap();
    std::fs::write(prefix.join("data/meta.json"), "{\"mine\":1}").unwrap();
    let second = install();
    assert_eq!(second.code, 0, "{}{}", second.stdout, second.stderr);
    assert!(
        second
            .stdout
            .contains(&format!("kept existing {}", conf.display())),
        "{}",
        second.stdout
    );
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), edited);
    assert_eq!(
        std::fs::read_to_string(prefix.join("data/meta.json")).unwrap(),
        "{\"mine\":1}"
    );

    let help = run(Command::new(prefix.join("bin/clupadm")).arg("--help"));
    assert_eq!(help.code, 0, "{}", help.stderr);
    assert!(help.stdout.contains("usage: clupadm"), "{}", help.stdout);
    assert!(help.stdout.contains("task_log"), "{}", help.stdout);
}

#[test]
fn static_binary_runs_alone_in_a_chroot() {
    let bin = repo().join(STATIC_BIN);
    assert!(
        bin.exists(),
        "{} is missing: run scripts/build-static first",
        bin.display()
    );
    let tmp = TempDir::new("chroot");
    std::fs::copy(&bin, tmp.0.join("clup")).unwrap();
    std::os::unix::fs::symlink("clup", tmp.0.join("clupadm")).unwrap();

    let version = run(Command::new("chroot")
        .arg(&tmp.0)
        .arg("/clup")
        .arg("--version"));
    assert_eq!(
        version.code, 0,
        "chroot /clup --version: {}",
        version.stderr
    );
    assert!(version.stdout.starts_with("clup "), "{}", version.stdout);

    let help = run(Command::new("chroot")
        .arg(&tmp.0)
        .arg("/clupadm")
        .arg("--help"));
    assert_eq!(help.code, 0, "chroot /clupadm --help: {}", help.stderr);
    assert!(help.stdout.contains("usage: clupadm"), "{}", help.stdout);
}

/// cstlb(8) documents every option cstlb's own --help lists.
#[test]
fn cstlb_man_page_lists_every_option_of_its_usage() {
    let out = std::process::Command::new(crate::util::BIN)
        .args(["lb", "--help"])
        .output()
        .unwrap();
    let usage =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let man = read("man/cstlb.8").replace("\\-", "-");
    let opts: std::collections::BTreeSet<&str> = usage
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .collect();
    assert!(
        opts.len() >= 10,
        "cstlb --help lists too few options:\n{usage}"
    );
    for o in opts {
        assert!(man.contains(o), "man/cstlb.8 does not document {o}");
    }
}
