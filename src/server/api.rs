//! clupserver's HTTP interface, as a router that knows nothing of sockets.
//!
//! Two audiences share one port:
//! - programs (cstlb, proxies, Prometheus) use `GET /<cluster>/get_lb_host`,
//!   `GET /<cluster>/primary|replica` ([`crate::server::health`]), `GET /metrics`
//!   ([`crate::server::metrics`]), `GET /events?since=N`, authenticated by `http_token` (query `token=`,
//!   header `X-Clup-Token` or `Authorization: Bearer`), and `GET /health`;
//! - browsers open the status page `GET /`, which polls `GET /api/status`
//!   with the token ([`crate::server::status`]);
//! - clupadm uses `POST /admin/<command>` with a JSON body, authenticated by
//!   `ha_rpc_pass` in the `X-Clup-Pass` header (never in the URL).
//!
//! Every answer is JSON (but /metrics' text and the page). Wrong or missing
//! credentials get 401 and nothing else happens; bodies over [`MAX_BODY`]
//! get 413.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Value};

use crate::model::config::{clip, constant_time_eq, Config};
use crate::model::event::{EventKind, NewEvent};
use crate::model::meta::{self, Clusters, CLUSTER_FROZEN, CLUSTER_NORMAL};
use crate::store::{update, MetaStore, UpdateError};
use crate::util::url::split_url;

/// Largest request body accepted (change_meta of a large installation fits).
pub const MAX_BODY: usize = 1 << 20;

/// A request, as the router sees it.
pub struct Req<'a> {
    pub method: &'a str,
    /// Path and query, e.g. `/cluster01/get_lb_host?token=x`.
    pub url: &'a str,
    pub header: &'a dyn Fn(&str) -> Option<String>,
    pub body: &'a [u8],
}

/// A response: status and JSON body, or (for /metrics and the page) a text body with its
/// own content type in `text`, which the server then sends instead of `body`.
#[derive(Debug, PartialEq)]
pub struct Resp {
    pub status: u16,
    pub body: Value,
    /// `(content type, text)`; None for the usual JSON answer.
    pub text: Option<(&'static str, String)>,
}

impl Resp {
    pub fn ok(data: Value) -> Resp {
        Resp {
            status: 200,
            body: json!({"ok": true, "data": data}),
            text: None,
        }
    }
    pub fn err(status: u16, msg: impl Into<String>) -> Resp {
        Resp {
            status,
            body: json!({"ok": false, "error": msg.into()}),
            text: None,
        }
    }
    /// A non-JSON answer, e.g. the Prometheus text format.
    pub fn text(status: u16, content_type: &'static str, text: String) -> Resp {
        Resp {
            status,
            body: Value::Null,
            text: Some((content_type, text)),
        }
    }
}

/// What the router needs from the running server.
pub struct Ctx {
    pub cfg: Config,
    pub store: Arc<dyn MetaStore>,
    /// data/tasks under the home: task logs.
    pub task_dir: std::path::PathBuf,
    /// The running monitor (None in tests of the router alone).
    pub monitor: Option<Arc<crate::monitor::Shared>>,
}

pub fn route(ctx: &Ctx, req: &Req) -> Resp {
    if req.body.len() > MAX_BODY {
        return Resp::err(413, format!("request body over {MAX_BODY} bytes"));
    }
    let (path, query) = split_url(req.url);
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method, parts.as_slice()) {
        ("POST", ["admin", cmd]) => {
            let pass = (req.header)("x-clup-pass").unwrap_or_default();
            if !constant_time_eq(pass.as_bytes(), ctx.cfg.ha_rpc_pass.expose().as_bytes()) {
                return Resp::err(401, "wrong or missing ha_rpc_pass");
            }
            let args: Value = if req.body.is_empty() {
                json!({})
            } else {
                match serde_json::from_slice(req.body) {
                    Ok(v @ Value::Object(_)) => v,
                    _ => return Resp::err(400, "request body must be a JSON object"),
                }
            };
            admin(ctx, cmd, &args)
        }
        ("GET", [""]) => crate::server::status::page(),
        ("GET", ["api", "status"]) => crate::server::status::serve(ctx, req, &query),
        ("GET", ["health"]) => Resp::ok(json!({"status": "ok"})),
        ("GET", ["events"]) => events(ctx, req, &query),
        ("GET", ["metrics"]) => crate::server::metrics::serve(ctx, req, &query),
        ("GET", [cluster, what @ ("primary" | "replica")]) => {
            crate::server::health::route(ctx, req, &query, cluster, what)
        }
        ("GET", [cluster, "get_lb_host"]) => {
            if let Some(r) = check_token(ctx, req, &query) {
                return r;
            }
            let clusters = match load(ctx) {
                Ok(c) => c,
                Err(r) => return r,
            };
            let Some(c) = clusters.get(*cluster) else {
                return Resp::err(404, format!("no cluster named '{}'", clip(cluster)));
            };
            let backends = match crate::server::health::lb_backends_for(ctx, &query, cluster, c) {
                Ok(b) => b,
                Err(r) => return r,
            };
            Resp::ok(json!({
                "cluster": cluster,
                "backends": backends,
                "cstlb_token": ctx.cfg.cstlb_token.expose(),
            }))
        }
        _ => Resp::err(
            404,
            format!("no such endpoint: {} {}", clip(req.method), clip(path)),
        ),
    }
}

/// `GET /events?since=N`: the recorded events numbered above N (all kept
/// ones without `since`), oldest first, and the last number handed out so
/// far, for the next `since`. Authenticated by `http_token`.
fn events(ctx: &Ctx, req: &Req, query: &BTreeMap<String, String>) -> Resp {
    if let Some(r) = check_token(ctx, req, query) {
        return r;
    }
    let since = match query.get("since").map(|v| v.parse::<u64>()) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return Resp::err(400, "since must be a whole number (a sequence number)"),
    };
    let Some(m) = &ctx.monitor else {
        return Resp::err(503, "the monitor is not running");
    };
    let events = m.events.since(since);
    let last = events.last().map_or(since, |e| e.seq);
    Resp::ok(json!({ "events": events, "last": last }))
}

/// `http_token` from `X-Clup-Token`, `Authorization: Bearer` (Prometheus)
/// or `token=`; Some(401) when it is wrong or missing.
pub(crate) fn check_token(ctx: &Ctx, req: &Req, query: &BTreeMap<String, String>) -> Option<Resp> {
    let bearer = || {
        (req.header)("authorization").and_then(|a| {
            let scheme = a.get(..7)?;
            scheme
                .eq_ignore_ascii_case("bearer ")
                .then(|| a[7..].trim().to_string())
        })
    };
    let given = (req.header)("x-clup-token")
        .or_else(bearer)
        .or_else(|| query.get("token").cloned())
        .unwrap_or_default();
    if constant_time_eq(given.as_bytes(), ctx.cfg.http_token.expose().as_bytes()) {
        None
    } else {
        Some(Resp::err(401, "wrong or missing token"))
    }
}

pub(crate) fn load(ctx: &Ctx) -> Result<Clusters, Resp> {
    ctx.store
        .load()
        .map(|d| d.clusters)
        .map_err(|e| Resp::err(500, e.to_string()))
}

fn arg_str<'a>(args: &'a Value, name: &str) -> Option<&'a str> {
    args.get(name).and_then(Value::as_str)
}

/// The cluster an admin command is about: `cluster` if given, else the only one.
fn pick_cluster(clusters: &Clusters, args: &Value) -> Result<String, Resp> {
    match arg_str(args, "cluster") {
        Some(c) if clusters.contains_key(c) => Ok(c.to_string()),
        Some(c) => Err(Resp::err(404, format!("no cluster named '{}'", clip(c)))),
        None if clusters.len() == 1 => Ok(clusters.keys().next().cloned().unwrap_or_default()),
        None => Err(Resp::err(
            400,
            format!(
                "several clusters ({}): name one with -c",
                clusters.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

fn refused(e: UpdateError) -> Resp {
    match e {
        UpdateError::Refused(m) => Resp::err(409, m),
        UpdateError::Store(e) => Resp::err(500, e.to_string()),
    }
}

/// The admin commands that change something: only the leading clupserver
/// takes them.
const WRITES: [&str; 5] = ["froze", "unfroze", "change_meta", "switch", "repair"];

/// A follower's answer to a write: 421 with the leader's `host:port`, which
/// clupadm asks instead.
fn not_leader(ctx: &Ctx) -> Option<Resp> {
    let gate = &ctx.monitor.as_ref()?.gate;
    let leader = gate.not_leading()?;
    let msg = match &leader {
        Some(l) => format!("clupserver {} does not lead; the leader is {l}", gate.id()),
        None => format!(
            "clupserver {} does not lead and no clupserver leads now (is etcd reachable?)",
            gate.id()
        ),
    };
    Some(Resp {
        status: 421,
        body: json!({"ok": false, "error": msg, "leader": leader}),
        text: None,
    })
}

/// `POST /admin/<cmd>`: a write only on the leader (421 elsewhere), the meta
/// loaded (500 if it cannot be), then the command.
fn admin(ctx: &Ctx, cmd: &str, args: &Value) -> Resp {
    if WRITES.contains(&cmd) {
        if let Some(r) = not_leader(ctx) {
            return r;
        }
    }
    let clusters = match load(ctx) {
        Ok(c) => c,
        Err(r) => return r,
    };
    match cmd {
        "show" | "get_meta" => admin_show(ctx, &clusters, args, cmd == "show"),
        "froze" => admin_freeze(ctx, &clusters, args, true),
        "unfroze" => admin_freeze(ctx, &clusters, args, false),
        "change_meta" => admin_change_meta(ctx, args),
        "get_last_lsn" => admin_last_lsn(ctx, &clusters, args),
        "repl_delay" => admin_repl_delay(ctx, &clusters, args),
        "switch" => admin_switch(ctx, &clusters, args),
        "repair" => admin_repair(ctx, &clusters, args),
        "show_task" => admin_show_task(ctx, args),
        "task_log" => admin_task_log(ctx, args),
        _ => Resp::err(404, format!("unknown command '{}'", clip(cmd))),
    }
}

/// `show` and `get_meta`: the meta of one cluster or of all, with etcd
/// this clupserver's role, and for `show` with use_slots the standbys'
/// slots on their primaries, read now.
fn admin_show(ctx: &Ctx, clusters: &Clusters, args: &Value, slots: bool) -> Resp {
    let shown: Clusters = match arg_str(args, "cluster") {
        None => clusters.clone(),
        Some(_) => match pick_cluster(clusters, args) {
            Ok(name) => Clusters::from([(name.clone(), clusters[&name].clone())]),
            Err(r) => return r,
        },
    };
    let mut v = json!({ "clusters": shown });
    if let Some(m) = ctx.monitor.as_ref().filter(|_| slots && ctx.cfg.use_slots) {
        let rows: Vec<_> = shown
            .iter()
            .flat_map(|(name, c)| crate::monitor::slots::rows(m, name, c))
            .collect();
        v["slots"] = json!(rows);
    }
    if let Some(g) = ctx
        .monitor
        .as_ref()
        .map(|m| &m.gate)
        .filter(|g| g.is_elected())
    {
        v["monitor"] = json!(g.role());
    }
    Resp::ok(v)
}

/// `froze` (`freeze` true) and `unfroze`: set the cluster's state in the
/// meta, refusing when it is already there.
fn admin_freeze(ctx: &Ctx, clusters: &Clusters, args: &Value, freeze: bool) -> Resp {
    let name = match pick_cluster(clusters, args) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let (from, to, verb) = if freeze {
        (None, CLUSTER_FROZEN, "frozen")
    } else {
        (Some(CLUSTER_FROZEN), CLUSTER_NORMAL, "unfrozen")
    };
    let res = update(&*ctx.store, |doc| {
        let c = doc.clusters.get_mut(&name).ok_or("cluster vanished")?;
        if let Some(f) = from {
            if c.state != f {
                return Err(format!("cluster '{name}' is not frozen"));
            }
        }
        if c.state == to {
            return Err(format!("cluster '{name}' is already {verb}"));
        }
        c.state = to;
        Ok(())
    });
    match res {
        Ok(_) => {
            log::info!("Cluster({name}) {verb} by clupadm.");
            if let Some(m) = &ctx.monitor {
                let kind = if freeze {
                    EventKind::Froze
                } else {
                    EventKind::Unfroze
                };
                m.emit(NewEvent::new(kind, &name).reason(&format!(
                    "{verb} by clupadm {}",
                    if freeze { "froze" } else { "unfroze" }
                )));
            }
            Resp::ok(json!({ "cluster": name, "state": meta::cluster_state_name(to) }))
        }
        Err(e) => refused(e),
    }
}

/// `change_meta`: replace one cluster's meta with a validated new one,
/// unless an operation holds its lock.
fn admin_change_meta(ctx: &Ctx, args: &Value) -> Resp {
    let Some(name) = arg_str(args, "cluster").map(str::to_string) else {
        return Resp::err(400, "change_meta needs a cluster name (-c)");
    };
    let Some(new) = args.get("meta") else {
        return Resp::err(400, "change_meta needs the new meta");
    };
    let parsed = match meta::clusters_from_value(&json!({ name.clone(): new })) {
        Ok(mut c) => c.remove(&name).expect("just inserted"),
        Err(e) => return Resp::err(400, e.to_string()),
    };
    let res = update(&*ctx.store, |doc| {
        let slot = doc
            .clusters
            .get_mut(&name)
            .ok_or_else(|| format!("no cluster named '{name}'"))?;
        if slot.lock_time > crate::now_secs() && parsed.lock_time == 0 {
            return Err(format!(
                "cluster '{name}' is locked by {}; wait for it to finish",
                if slot.lock_holder.is_empty() {
                    "an operation"
                } else {
                    &slot.lock_holder
                }
            ));
        }
        *slot = parsed.clone();
        Ok(())
    });
    match res {
        Ok(_) => {
            log::info!("Cluster({name}) meta changed by clupadm change_meta.");
            Resp::ok(json!({ "cluster": name }))
        }
        Err(e) => refused(e),
    }
}

/// What the commands served by the monitor need: the running monitor (503
/// without it, checked first) and the cluster's name.
fn monitor_and_cluster<'a>(
    ctx: &'a Ctx,
    clusters: &Clusters,
    args: &Value,
) -> Result<(&'a Arc<crate::monitor::Shared>, String), Resp> {
    let Some(m) = &ctx.monitor else {
        return Err(Resp::err(503, "the monitor is not running"));
    };
    Ok((m, pick_cluster(clusters, args)?))
}

/// The database id (`id`) of switch and repair.
fn arg_db_id(args: &Value) -> Option<u32> {
    args.get("id").and_then(Value::as_u64).map(|i| i as u32)
}

/// The answer to a started task: its id and name, or 409 with why it did
/// not start.
fn task_started(r: Result<(u64, String), String>) -> Resp {
    match r {
        Ok((id, name)) => Resp::ok(json!({ "task_id": id, "task_name": name })),
        Err(e) => Resp::err(409, e),
    }
}

/// `get_last_lsn`: every database's last LSN, asked now.
fn admin_last_lsn(ctx: &Ctx, clusters: &Clusters, args: &Value) -> Resp {
    match monitor_and_cluster(ctx, clusters, args) {
        Ok((m, name)) => {
            let rows = crate::monitor::ops::last_lsn(m, &clusters[&name]);
            Resp::ok(json!({ "cluster": name, "rows": rows }))
        }
        Err(r) => r,
    }
}

/// `repl_delay`: every standby's replication delay, asked now.
fn admin_repl_delay(ctx: &Ctx, clusters: &Clusters, args: &Value) -> Resp {
    match monitor_and_cluster(ctx, clusters, args) {
        Ok((m, name)) => {
            let rows = crate::monitor::ops::repl_delay(m, &clusters[&name]);
            Resp::ok(json!({ "cluster": name, "rows": rows }))
        }
        Err(r) => r,
    }
}

/// `switch`: start a switchover task to database `id`.
fn admin_switch(ctx: &Ctx, clusters: &Clusters, args: &Value) -> Resp {
    let (m, name) = match monitor_and_cluster(ctx, clusters, args) {
        Ok(x) => x,
        Err(r) => return r,
    };
    match arg_db_id(args) {
        Some(id) => task_started(crate::monitor::ops::start_switch(m, &name, id)),
        None => Resp::err(400, "switch needs a database id (-i)"),
    }
}

/// `repair`: start a repair task of database `id` in the given `mode`.
fn admin_repair(ctx: &Ctx, clusters: &Clusters, args: &Value) -> Resp {
    use crate::monitor::ops::RepairMode;
    let (m, name) = match monitor_and_cluster(ctx, clusters, args) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let mode = match arg_str(args, "mode") {
        None | Some("plain") => RepairMode::Plain,
        Some("rewind") => RepairMode::Rewind,
        Some("rebuild") => RepairMode::Rebuild,
        Some(o) => return Resp::err(400, format!("unknown repair mode '{o}'")),
    };
    match arg_db_id(args) {
        Some(id) => task_started(crate::monitor::ops::start_repair(m, &name, id, mode)),
        None => Resp::err(400, "repair needs a database id (-i)"),
    }
}

/// `show_task`: the task records, of one cluster if `cluster` is given.
fn admin_show_task(ctx: &Ctx, args: &Value) -> Resp {
    let cluster = arg_str(args, "cluster");
    let doc = match ctx.store.load() {
        Ok(d) => d,
        Err(e) => return Resp::err(500, e.to_string()),
    };
    let tasks: Vec<&crate::store::Task> = doc
        .tasks
        .iter()
        .filter(|t| cluster.is_none_or(|c| t.cluster == c))
        .collect();
    Resp::ok(json!({ "tasks": tasks }))
}

/// `task_log`: a task's record and a page of its log from `offset`.
fn admin_task_log(ctx: &Ctx, args: &Value) -> Resp {
    let Some(id) = args.get("task").and_then(Value::as_u64) else {
        return Resp::err(400, "task_log needs a task id (-t)");
    };
    let offset = args.get("offset").and_then(Value::as_u64).unwrap_or(0);
    let doc = match ctx.store.load() {
        Ok(d) => d,
        Err(e) => return Resp::err(500, e.to_string()),
    };
    let Some(task) = doc.tasks.iter().find(|t| t.id == id) else {
        return Resp::err(404, format!("no task {id}"));
    };
    let path = crate::monitor::task::log_path(&ctx.task_dir, id);
    let text = std::fs::read(&path).unwrap_or_default();
    let from = (offset as usize).min(text.len());
    // At most 256 KiB per answer; the client asks again from `offset`.
    let to = (from + (256 << 10)).min(text.len());
    Resp::ok(json!({
        "task": task,
        "text": String::from_utf8_lossy(&text[from..to]),
        "offset": to,
        "more": to < text.len(),
    }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::config::SAMPLE;
    use crate::model::meta::{parse_clusters, SAMPLE_INIT};
    use crate::store::{FileStore, MetaDoc};
    use std::path::Path;

    pub(crate) fn ctx(tag: &str) -> Ctx {
        let dir = std::env::temp_dir().join(format!("clup-api-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = FileStore::new(&dir);
        store
            .save(&MetaDoc {
                clusters: parse_clusters(SAMPLE_INIT).unwrap(),
                ..Default::default()
            })
            .unwrap();
        Ctx {
            cfg: Config::parse(SAMPLE, Path::new("clup.conf")).unwrap(),
            store: Arc::new(store),
            task_dir: dir.join("tasks"),
            monitor: None,
        }
    }

    pub(crate) fn call(
        ctx: &Ctx,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Resp {
        let h: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let header = move |name: &str| {
            h.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        route(
            ctx,
            &Req {
                method,
                url,
                header: &header,
                body: body.as_bytes(),
            },
        )
    }

    pub(crate) const TOKEN: &str = "540cd628-d74e-11e7-992e-60f81dd129c2";
    const PASS: (&str, &str) = ("X-Clup-Pass", "csha_cluster_pass");

    #[test]
    fn get_lb_host_lists_normal_standbys() {
        let c = ctx("lb");
        let r = call(
            &c,
            "GET",
            &format!("/cluster01/get_lb_host?token={TOKEN}"),
            &[],
            "",
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body["data"]["backends"],
            json!([
                "192.168.56.42:5432",
                "192.168.56.43:5432",
                "192.168.56.44:5432"
            ])
        );
        let r = call(
            &c,
            "GET",
            "/cluster01/get_lb_host",
            &[("X-Clup-Token", TOKEN)],
            "",
        );
        assert_eq!(r.status, 200);
    }

    #[test]
    fn wrong_token_unknown_cluster_and_route() {
        let c = ctx("tok");
        assert_eq!(
            call(&c, "GET", "/cluster01/get_lb_host?token=nope", &[], "").status,
            401
        );
        assert_eq!(
            call(&c, "GET", "/cluster01/get_lb_host", &[], "").status,
            401
        );
        let r = call(
            &c,
            "GET",
            &format!("/clusterX/get_lb_host?token={TOKEN}"),
            &[],
            "",
        );
        assert_eq!(r.status, 404);
        assert_eq!(call(&c, "GET", "/nothing/here/at/all", &[], "").status, 404);
        // 401 comes before 404: no cluster names leak to the unauthenticated.
        assert_eq!(
            call(&c, "GET", "/clusterX/get_lb_host", &[], "").status,
            401
        );
    }

    #[test]
    fn admin_needs_password_in_header() {
        let c = ctx("pass");
        assert_eq!(call(&c, "POST", "/admin/show", &[], "{}").status, 401);
        assert_eq!(
            call(&c, "POST", "/admin/show?pass=csha_cluster_pass", &[], "{}").status,
            401
        );
        assert_eq!(
            call(&c, "POST", "/admin/show", &[("X-Clup-Pass", "bad")], "{}").status,
            401
        );
        let r = call(&c, "POST", "/admin/show", &[PASS], "{}");
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body["data"]["clusters"]["cluster01"]["write_vip"],
            "192.168.56.40"
        );
        assert_eq!(call(&c, "POST", "/admin/show", &[PASS], "[1]").status, 400);
        assert_eq!(call(&c, "POST", "/admin/nope", &[PASS], "{}").status, 404);
    }

    #[test]
    fn huge_body_is_413() {
        let c = ctx("huge");
        let big = "x".repeat(MAX_BODY + 1);
        assert_eq!(call(&c, "POST", "/admin/show", &[PASS], &big).status, 413);
    }

    #[test]
    fn froze_and_unfroze() {
        let c = ctx("froze");
        let r = call(
            &c,
            "POST",
            "/admin/froze",
            &[PASS],
            "{\"cluster\":\"cluster01\"}",
        );
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(
            c.store.load().unwrap().clusters["cluster01"].state,
            CLUSTER_FROZEN
        );
        let r = call(&c, "POST", "/admin/froze", &[PASS], "{}");
        assert_eq!(r.status, 409);
        assert!(r.body["error"].as_str().unwrap().contains("already frozen"));
        assert_eq!(
            call(&c, "POST", "/admin/unfroze", &[PASS], "{}").status,
            200
        );
        assert_eq!(
            c.store.load().unwrap().clusters["cluster01"].state,
            CLUSTER_NORMAL
        );
        assert_eq!(
            call(&c, "POST", "/admin/unfroze", &[PASS], "{}").status,
            409
        );
        let r = call(&c, "POST", "/admin/froze", &[PASS], "{\"cluster\":\"x\"}");
        assert_eq!(r.status, 404);
    }

    #[test]
    fn change_meta_validates() {
        let c = ctx("change");
        let mut m = serde_json::to_value(&c.store.load().unwrap().clusters["cluster01"]).unwrap();
        m["db_list"][1]["is_primary"] = json!(1);
        let body = json!({"cluster": "cluster01", "meta": m}).to_string();
        let r = call(&c, "POST", "/admin/change_meta", &[PASS], &body);
        assert_eq!(r.status, 400);
        assert!(
            r.body["error"]
                .as_str()
                .unwrap()
                .contains("exactly one database"),
            "{r:?}"
        );
        assert_eq!(c.store.load().unwrap().version, 1);

        m["db_list"][1]["is_primary"] = json!(0);
        m["db_list"][3]["state"] = json!(2);
        let body = json!({"cluster": "cluster01", "meta": m}).to_string();
        let r = call(&c, "POST", "/admin/change_meta", &[PASS], &body);
        assert_eq!(r.status, 200, "{r:?}");
        let doc = c.store.load().unwrap();
        assert_eq!(doc.version, 2);
        assert_eq!(doc.clusters["cluster01"].db_list[3].state, 2);
    }

    #[test]
    fn tasks_are_listed_and_their_logs_paged() {
        let c = ctx("tasks");
        std::fs::create_dir_all(&c.task_dir).unwrap();
        let t = crate::monitor::task::begin(
            &*c.store,
            &c.task_dir,
            "cluster01",
            "repair cluster01(dbid=4)",
        )
        .unwrap();
        t.info("line one");
        let r = call(&c, "POST", "/admin/show_task", &[PASS], "{}");
        assert_eq!(
            r.body["data"]["tasks"][0]["name"],
            "repair cluster01(dbid=4)"
        );
        let r = call(
            &c,
            "POST",
            "/admin/show_task",
            &[PASS],
            "{\"cluster\":\"other\"}",
        );
        assert_eq!(r.body["data"]["tasks"], json!([]));
        let r = call(
            &c,
            "POST",
            "/admin/task_log",
            &[PASS],
            &format!("{{\"task\":{}}}", t.id),
        );
        assert!(
            r.body["data"]["text"]
                .as_str()
                .unwrap()
                .ends_with(":INFO: line one\n"),
            "{r:?}"
        );
        let off = r.body["data"]["offset"].as_u64().unwrap();
        t.info("line two");
        let body = format!("{{\"task\":{},\"offset\":{off}}}", t.id);
        let r = call(&c, "POST", "/admin/task_log", &[PASS], &body);
        assert!(
            r.body["data"]["text"]
                .as_str()
                .unwrap()
                .ends_with(":INFO: line two\n"),
            "{r:?}"
        );
        assert_eq!(r.body["data"]["task"]["state"], "running");
        assert_eq!(
            call(&c, "POST", "/admin/task_log", &[PASS], "{\"task\":99}").status,
            404
        );
        assert_eq!(
            call(&c, "POST", "/admin/task_log", &[PASS], "{}").status,
            400
        );
    }

    #[test]
    fn query_decoding() {
        let (p, q) = split_url("/a/b?token=a%2Bb+c&x&bad=%zz%");
        assert_eq!(p, "/a/b");
        assert_eq!(q["token"], "a+b c");
        assert_eq!(q["x"], "");
        assert_eq!(q["bad"], "%zz%");
    }
}
