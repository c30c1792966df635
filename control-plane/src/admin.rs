//! The ConsentAdmin service: converts requests into domain values (naming the
//! field that is invalid), runs the ledger's plans through the store, and
//! publishes each commit to the sync streams.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use consent_core::grant::check_id;
use consent_core::wire::{names_from_wire, permissions_from_wire, v1};
use consent_core::{ConsentClaims, Grant, Status as GrantStatus};
use tonic::{Request, Response, Status};

use crate::hub::{Hub, blocking};
use crate::ledger::{self, Amendment};
use crate::proto::consent_admin_server::ConsentAdmin;
use crate::status::invalid;
use crate::store::{AuditQuery, GrantFilter, StatusFilter, StoreError, now_ms};

const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

#[derive(Debug)]
pub struct AdminService {
    hub: Arc<Hub>,
}

impl AdminService {
    pub fn new(hub: Arc<Hub>) -> Self {
        AdminService { hub }
    }

    /// Counts and times every call by method and outcome.
    async fn observe<T>(
        &self,
        method: &'static str,
        call: impl Future<Output = Result<T, Status>>,
    ) -> Result<Response<T>, Status> {
        let started = Instant::now();
        let result = call.await;
        let code = result
            .as_ref()
            .map(|_| tonic::Code::Ok)
            .unwrap_or_else(|s| s.code());
        self.hub
            .metrics
            .observe_admin(method, code, started.elapsed());
        result.map(Response::new)
    }

    async fn write(
        &self,
        mut plan: impl FnMut(
            &dyn crate::store::Reader,
            crate::store::WriteContext,
        ) -> Result<crate::store::Change, StoreError>
        + Send
        + 'static,
    ) -> Result<crate::store::Commit, Status> {
        let commit = blocking(&self.hub.store, move |s| s.write(&mut plan)).await?;
        self.hub.committed(&commit);
        Ok(commit)
    }

    async fn create(&self, r: v1::CreateGrantRequest) -> Result<v1::GrantResponse, Status> {
        let id = if r.id.is_empty() {
            format!("g-{:016x}", rand::random::<u64>())
        } else {
            r.id
        };
        let grant = Grant {
            id,
            subject: r.subject,
            grantee: r.grantee,
            issued_by: r.issued_by,
            owner: r.owner,
            purposes: names_from_wire(r.purposes, "purposes").map_err(StoreError::from)?,
            datasets: names_from_wire(r.datasets, "datasets").map_err(StoreError::from)?,
            actions: names_from_wire(r.actions, "actions").map_err(StoreError::from)?,
            permissions: permissions_from_wire(&r.permissions, "permissions")
                .map_err(StoreError::from)?,
            not_before: r.not_before,
            expires_at: r.expires_at,
            parent: Some(r.parent).filter(|p| !p.is_empty()),
            status: GrantStatus::Active,
            revision: 0,
        };
        let (actor, limits) = (r.actor, self.hub.settings.limits);
        let commit = self
            .write(move |reader, ctx| ledger::create(reader, ctx, grant.clone(), &actor, &limits))
            .await?;
        Ok(v1::GrantResponse {
            grant: commit.grants.first().map(v1::Grant::from),
        })
    }

    async fn amend(&self, r: v1::AmendGrantRequest) -> Result<v1::GrantResponse, Status> {
        let names = |l: Option<v1::StringList>, field: &str| {
            l.map(|l| names_from_wire(l.values, field))
                .transpose()
                .map_err(StoreError::from)
        };
        let amendment = Amendment {
            purposes: names(r.purposes, "purposes")?,
            datasets: names(r.datasets, "datasets")?,
            actions: names(r.actions, "actions")?,
            permissions: r
                .permissions
                .map(|l| permissions_from_wire(&l.values, "permissions"))
                .transpose()
                .map_err(StoreError::from)?,
            not_before: r.not_before,
            expires_at: r.expires_at,
        };
        check_id("id", &r.id).map_err(StoreError::from)?;
        let (id, actor, reason, limits) = (r.id, r.actor, r.reason, self.hub.settings.limits);
        let commit = self
            .write(move |reader, ctx| {
                ledger::amend(reader, ctx, &id, &amendment, &actor, &reason, &limits)
            })
            .await?;
        Ok(v1::GrantResponse {
            grant: commit.grants.first().map(v1::Grant::from),
        })
    }

    async fn revoke(&self, r: v1::RevokeGrantRequest) -> Result<v1::RevokeGrantResponse, Status> {
        check_id("id", &r.id).map_err(StoreError::from)?;
        let (id, actor, reason) = (r.id, r.actor, r.reason);
        let commit = self
            .write(move |reader, ctx| ledger::revoke(reader, ctx, &id, &actor, &reason))
            .await?;
        let datasets: BTreeSet<String> = commit
            .grants
            .iter()
            .flat_map(|g| g.datasets.iter().cloned())
            .collect();
        Ok(v1::RevokeGrantResponse {
            revision: commit.revision,
            revoked: commit.grants.iter().map(|g| g.id.clone()).collect(),
            datasets: datasets.into_iter().collect(),
        })
    }

    async fn get(&self, r: v1::GetGrantRequest) -> Result<v1::GrantResponse, Status> {
        check_id("id", &r.id).map_err(StoreError::from)?;
        let id = r.id.clone();
        let grant = blocking(&self.hub.store, move |s| s.grant(&id))
            .await?
            .ok_or(StoreError::NotFound {
                what: "grant",
                id: r.id,
            })?;
        Ok(v1::GrantResponse {
            grant: Some(v1::Grant::from(&grant)),
        })
    }

    async fn list(&self, r: v1::ListGrantsRequest) -> Result<v1::ListGrantsResponse, Status> {
        let status = match v1::GrantStatus::try_from(r.status) {
            Ok(v1::GrantStatus::Unspecified) => None,
            Ok(v1::GrantStatus::Active) => Some(StatusFilter::Active),
            Ok(v1::GrantStatus::Revoked) => Some(StatusFilter::Revoked),
            Ok(v1::GrantStatus::Expired) => Some(StatusFilter::Expired),
            Err(_) => return Err(invalid("status", format!("{} is not a status", r.status))),
        };
        if r.page_size > MAX_PAGE {
            return Err(invalid("page_size", format!("at most {MAX_PAGE}")));
        }
        let limit = if r.page_size == 0 {
            DEFAULT_PAGE
        } else {
            r.page_size
        } as usize;
        let some = |s: String| Some(s).filter(|s| !s.is_empty());
        let filter = GrantFilter {
            subject: some(r.subject),
            grantee: some(r.grantee),
            dataset: some(r.dataset),
            status,
            after: some(r.page_token),
            limit: limit + 1,
            now: now_ms() / 1000,
        };
        let mut grants = blocking(&self.hub.store, move |s| s.list(&filter)).await?;
        let next_page_token = if grants.len() > limit {
            grants.truncate(limit);
            grants.last().map(|g| g.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(v1::ListGrantsResponse {
            grants: grants.iter().map(v1::Grant::from).collect(),
            next_page_token,
        })
    }

    async fn issue_token(
        &self,
        r: v1::IssueTokenRequest,
    ) -> Result<v1::IssueTokenResponse, Status> {
        check_id("grant_id", &r.grant_id).map_err(StoreError::from)?;
        check_id("audience", &r.audience).map_err(StoreError::from)?;
        ledger::check_actor(&r.actor)?;
        let id = r.grant_id.clone();
        let (grant, keys) =
            blocking(&self.hub.store, move |s| Ok((s.grant(&id)?, s.keys()?))).await?;
        let grant = grant.ok_or(StoreError::NotFound {
            what: "grant",
            id: r.grant_id.clone(),
        })?;
        if r.grantee != grant.grantee {
            return Err(invalid("grantee", "is not the grant's grantee"));
        }
        let now = now_ms() / 1000;
        if !matches!(grant.status, GrantStatus::Active) {
            return Err(Status::failed_precondition(format!(
                "grant {} is {}",
                grant.id,
                grant.status.name()
            )));
        }
        if grant.expires_at <= now {
            return Err(Status::failed_precondition(format!(
                "grant {} has expired",
                grant.id
            )));
        }
        let max = self.hub.settings.max_token_ttl_secs;
        let ttl = if r.ttl_seconds == 0 {
            max
        } else {
            i64::from(r.ttl_seconds).min(max)
        };
        let expires_at = (now + ttl).min(grant.expires_at);
        let current = keys
            .iter()
            .find(|k| k.retire_after == 0)
            .ok_or_else(|| StoreError::Internal("no current signing key".into()))?;
        let key = current.signing_key()?;
        let jti = format!("t-{:032x}", rand::random::<u128>());
        let claims = ConsentClaims {
            issued_at: now,
            not_before: now.max(grant.not_before),
            expires_at,
            ..ConsentClaims::for_grant(&grant, &self.hub.settings.issuer, &r.audience, &jti)
        };
        let token = consent_core::issue(&key, &claims).map_err(StoreError::internal)?;
        let record = crate::store::ChangeRecord {
            kind: "issue_token",
            actor: r.actor,
            grant_id: grant.id.clone(),
            subject: grant.subject.clone(),
            detail: format!(
                "jti={jti} kid={} audience={} expires_at={expires_at}",
                key.kid(),
                r.audience
            ),
        };
        blocking(&self.hub.store, move |s| s.append_change(&record, now_ms())).await?;
        Ok(v1::IssueTokenResponse {
            token,
            jti,
            expires_at,
            kid: key.kid().to_owned(),
        })
    }

    async fn propagation(
        &self,
        r: v1::PropagationRequest,
        wait: bool,
    ) -> Result<v1::PropagationResponse, Status> {
        let head = self.hub.head();
        if r.revision == 0 || r.revision > head {
            return Err(invalid(
                "revision",
                format!(
                    "{} is not a committed revision (head is {head})",
                    r.revision
                ),
            ));
        }
        for d in &r.datasets {
            consent_core::grant::check_name("datasets", d).map_err(StoreError::from)?;
        }
        let datasets: BTreeSet<String> = r.datasets.into_iter().collect();
        let revision = r.revision;
        let committed_ms = blocking(&self.hub.store, move |s| s.revision_time(revision))
            .await?
            .unwrap_or(0);
        let timeout = std::time::Duration::from_millis(u64::from(r.timeout_ms))
            .min(self.hub.settings.max_wait);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut acks = self.hub.acks.subscribe();
        loop {
            acks.borrow_and_update();
            // Checked cheaply on every acknowledgement; the full, sorted
            // response is built once, when complete (or at the deadline).
            if !wait || self.hub.is_propagated(revision, &datasets, committed_ms) {
                let response = self.hub.propagation(revision, &datasets, committed_ms);
                // A sidecar may have connected in between: then wait for it too.
                if !wait || response.complete {
                    return Ok(response);
                }
            }
            tokio::select! {
                _ = acks.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    return Ok(self.hub.propagation(revision, &datasets, committed_ms));
                }
            }
        }
    }

    async fn query_audit(
        &self,
        r: v1::QueryAuditRequest,
    ) -> Result<v1::QueryAuditResponse, Status> {
        if r.limit > MAX_PAGE {
            return Err(invalid("limit", format!("at most {MAX_PAGE}")));
        }
        if r.from_ms < 0 || r.to_ms < 0 || (r.to_ms > 0 && r.to_ms < r.from_ms) {
            return Err(invalid("to_ms", "the time range is empty or negative"));
        }
        let some = |s: String| Some(s).filter(|s| !s.is_empty());
        let query = AuditQuery {
            grant_id: some(r.grant_id),
            subject: some(r.subject),
            request_id: some(r.request_id),
            from_ms: Some(r.from_ms).filter(|t| *t > 0),
            to_ms: Some(r.to_ms).filter(|t| *t > 0),
            limit: if r.limit == 0 { DEFAULT_PAGE } else { r.limit } as usize,
        };
        let records = blocking(&self.hub.store, move |s| s.query_audit(&query)).await?;
        Ok(v1::QueryAuditResponse { records })
    }

    async fn rotate(
        &self,
        r: v1::RotateSigningKeyRequest,
    ) -> Result<v1::RotateSigningKeyResponse, Status> {
        let retire = self.hub.settings.max_token_ttl_secs + self.hub.settings.token_tolerance_secs;
        let actor = r.actor;
        let kid = Arc::new(std::sync::Mutex::new(String::new()));
        let out = kid.clone();
        let commit = self
            .write(move |reader, ctx| {
                let (change, kid) = ledger::rotate(reader, ctx, &actor, retire)?;
                *out.lock().expect("kid") = kid;
                Ok(change)
            })
            .await?;
        let revision = commit.revision;
        let keys = blocking(&self.hub.store, move |s| s.key_set(revision)).await?;
        let kid = kid.lock().expect("kid").clone();
        Ok(v1::RotateSigningKeyResponse {
            kid,
            keys: Some(v1::KeySet::from(&keys)),
        })
    }
}

#[tonic::async_trait]
impl ConsentAdmin for AdminService {
    async fn create_grant(
        &self,
        r: Request<v1::CreateGrantRequest>,
    ) -> Result<Response<v1::GrantResponse>, Status> {
        self.observe("CreateGrant", self.create(r.into_inner()))
            .await
    }

    async fn amend_grant(
        &self,
        r: Request<v1::AmendGrantRequest>,
    ) -> Result<Response<v1::GrantResponse>, Status> {
        self.observe("AmendGrant", self.amend(r.into_inner())).await
    }

    async fn revoke_grant(
        &self,
        r: Request<v1::RevokeGrantRequest>,
    ) -> Result<Response<v1::RevokeGrantResponse>, Status> {
        self.observe("RevokeGrant", self.revoke(r.into_inner()))
            .await
    }

    async fn get_grant(
        &self,
        r: Request<v1::GetGrantRequest>,
    ) -> Result<Response<v1::GrantResponse>, Status> {
        self.observe("GetGrant", self.get(r.into_inner())).await
    }

    async fn list_grants(
        &self,
        r: Request<v1::ListGrantsRequest>,
    ) -> Result<Response<v1::ListGrantsResponse>, Status> {
        self.observe("ListGrants", self.list(r.into_inner())).await
    }

    async fn issue_token(
        &self,
        r: Request<v1::IssueTokenRequest>,
    ) -> Result<Response<v1::IssueTokenResponse>, Status> {
        self.observe(
            "IssueToken",
            AdminService::issue_token(self, r.into_inner()),
        )
        .await
    }

    async fn propagation_status(
        &self,
        r: Request<v1::PropagationRequest>,
    ) -> Result<Response<v1::PropagationResponse>, Status> {
        self.observe("PropagationStatus", self.propagation(r.into_inner(), false))
            .await
    }

    async fn wait_propagation(
        &self,
        r: Request<v1::PropagationRequest>,
    ) -> Result<Response<v1::PropagationResponse>, Status> {
        self.observe("WaitPropagation", self.propagation(r.into_inner(), true))
            .await
    }

    async fn list_sidecars(
        &self,
        _: Request<v1::ListSidecarsRequest>,
    ) -> Result<Response<v1::ListSidecarsResponse>, Status> {
        let hub = self.hub.clone();
        self.observe("ListSidecars", async move {
            let sidecars = hub
                .list_sidecars()
                .into_iter()
                .map(|s| v1::Sidecar {
                    node_id: s.node_id,
                    datasets: s.datasets,
                    acked_revision: s.acked_revision,
                    acked_at_ms: s.acked_at_ms,
                    connected: s.connected,
                    since_ms: s.since_ms,
                    filter_version: s.filter_version,
                })
                .collect();
            Ok(v1::ListSidecarsResponse { sidecars })
        })
        .await
    }

    async fn query_audit(
        &self,
        r: Request<v1::QueryAuditRequest>,
    ) -> Result<Response<v1::QueryAuditResponse>, Status> {
        self.observe(
            "QueryAudit",
            AdminService::query_audit(self, r.into_inner()),
        )
        .await
    }

    async fn rotate_signing_key(
        &self,
        r: Request<v1::RotateSigningKeyRequest>,
    ) -> Result<Response<v1::RotateSigningKeyResponse>, Status> {
        self.observe("RotateSigningKey", self.rotate(r.into_inner()))
            .await
    }
}
