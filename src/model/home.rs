//! The clup home: where conf, logs, run and data live.
//!
//! The home is the parent of the directory holding the binary
//! (`/opt/clup/bin/clup` -> `/opt/clup`), or `CLUP_HOME` when set (tests, and
//! installs that keep the binary elsewhere). Nothing here creates files except
//! [`Home::ensure_dirs`].

use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Home {
    pub root: PathBuf,
}

impl Home {
    /// The home for this process: `CLUP_HOME`, else the binary's grandparent.
    pub fn discover() -> Home {
        if let Some(h) = std::env::var_os("CLUP_HOME").filter(|h| !h.is_empty()) {
            return Home {
                root: PathBuf::from(h),
            };
        }
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/opt/clup/bin/clup"));
        Home {
            root: home_of_binary(&exe),
        }
    }

    pub fn at(root: impl Into<PathBuf>) -> Home {
        Home { root: root.into() }
    }

    pub fn conf_file(&self) -> PathBuf {
        self.root.join("conf/clup.conf")
    }
    pub fn init_json(&self) -> PathBuf {
        self.root.join("conf/init.json")
    }
    pub fn log_dir(&self) -> PathBuf {
        self.root.join("logs")
    }
    pub fn log_file(&self) -> PathBuf {
        self.root.join("logs/clupserver.log")
    }
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }
    pub fn pid_file(&self) -> PathBuf {
        self.root.join("run/clupserver.pid")
    }
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }
    pub fn task_dir(&self) -> PathBuf {
        self.root.join("data/tasks")
    }

    /// Create logs/, run/, data/ and data/tasks/ if missing.
    pub fn ensure_dirs(&self) -> std::io::Result<()> {
        for d in [
            self.log_dir(),
            self.run_dir(),
            self.data_dir(),
            self.task_dir(),
        ] {
            std::fs::create_dir_all(&d)
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", d.display())))?;
        }
        Ok(())
    }
}

/// `/opt/clup/bin/clup` -> `/opt/clup`, following a symlinked binary first.
pub fn home_of_binary(exe: &Path) -> PathBuf {
    let real = std::fs::canonicalize(exe).unwrap_or_else(|_| exe.to_path_buf());
    real.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/opt/clup"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_under_home() {
        let h = Home::at("/opt/clup");
        assert_eq!(h.conf_file(), Path::new("/opt/clup/conf/clup.conf"));
        assert_eq!(h.log_file(), Path::new("/opt/clup/logs/clupserver.log"));
        assert_eq!(h.pid_file(), Path::new("/opt/clup/run/clupserver.pid"));
        assert_eq!(h.data_dir(), Path::new("/opt/clup/data"));
    }

    #[test]
    fn home_is_grandparent_of_binary() {
        assert_eq!(
            home_of_binary(Path::new("/nonexistent/opt/clup/bin/clup")),
            Path::new("/nonexistent/opt/clup")
        );
    }
}
