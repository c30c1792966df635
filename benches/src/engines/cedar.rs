//! The consent check as a Cedar policy over entities, deployed the usual way:
//! the policy set and the entity store are built once, and each request is
//! one `Authorizer::is_authorized` over a `Request` built from it.
//!
//! The model: every grant is a `Grant` entity whose attributes are its
//! grantee (a `Grantee` entity reference), subject, status, validity window,
//! and its datasets, operations, purposes (sets of strings) and permissions
//! (a set of `Action` references). A request is principal `Grantee::"<caller>"`,
//! action `Action::"<permission>"`, resource `Grant::"<grant id>"`, and a
//! context with the clock, the subject, the dataset, the operation (the
//! route's action; Cedar's `action` is the permission) and the purpose. A
//! grant that is not in the store makes the policy error on its first
//! attribute read, and Cedar denies by default: the unknown-grant case.
//! Principals are not in the store: the policy compares the principal's uid
//! and reads none of its attributes.
//!
//! Requests are built without a schema (no per-request validation), which
//! favours Cedar.
//!
//! Loading (release): [`CedarEngine::load`] (`Entity::new` with restricted
//! expressions, then `Entities::from_entities`) takes 1.5 s and 0.6 GiB at
//! 100k grants, against 7.3 s for the same entities as JSON
//! ([`CedarEngine::load_json`]). At 1M it takes 23 to 30 s and about 6 GiB
//! (about half building the entities, half `from_entities`), and dropping
//! the store takes another 8 s.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use cedar_policy::{
    Authorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName, EntityUid,
    PolicySet, Request, RestrictedExpression,
};
use consent_core::{Grant, Permission};
use serde_json::json;

use super::Engine;
use crate::fixtures::Case;

/// The one policy.
pub const POLICY: &str = r#"
permit (
    principal is Grantee,
    action in [Action::"access", Action::"process", Action::"share"],
    resource is Grant
)
when {
    resource.grantee == principal &&
    resource.status == "active" &&
    resource.not_before <= context.now &&
    context.now < resource.expires_at &&
    resource.subject == context.subject &&
    resource.datasets.contains(context.dataset) &&
    resource.operations.contains(context.operation) &&
    resource.purposes.contains(context.purpose) &&
    resource.permissions.contains(action)
};
"#;

pub struct CedarEngine {
    authorizer: Authorizer,
    policies: PolicySet,
    entities: Entities,
    grantee_type: EntityTypeName,
    grant_type: EntityTypeName,
    /// `Action::"access"`, `"process"`, `"share"`, in [`Permission::ALL`] order.
    actions: [EntityUid; 3],
}

fn action_uid(permission: Permission) -> EntityUid {
    EntityUid::from_type_name_and_id(
        EntityTypeName::from_str("Action").expect("a valid type name"),
        EntityId::new(permission.as_str()),
    )
}

fn action_index(permission: Permission) -> usize {
    match permission {
        Permission::Access => 0,
        Permission::Process => 1,
        Permission::Share => 2,
    }
}

fn strings(set: &std::collections::BTreeSet<String>) -> RestrictedExpression {
    RestrictedExpression::new_set(set.iter().cloned().map(RestrictedExpression::new_string))
}

impl CedarEngine {
    fn empty() -> anyhow::Result<Self> {
        Ok(CedarEngine {
            authorizer: Authorizer::new(),
            policies: PolicySet::from_str(POLICY)?,
            entities: Entities::empty(),
            grantee_type: EntityTypeName::from_str("Grantee")?,
            grant_type: EntityTypeName::from_str("Grant")?,
            actions: Permission::ALL.map(action_uid),
        })
    }

    fn grant_uid(&self, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(self.grant_type.clone(), EntityId::new(id))
    }

    /// Builds one `Grant` entity per grant with `Entity::new` and its
    /// attributes as restricted expressions, then the store in one
    /// `Entities::from_entities` (no schema; no parents, so the transitive
    /// closure is trivial). The faster of the two load paths measured.
    pub fn load(grants: &[Grant]) -> anyhow::Result<Self> {
        let mut engine = Self::empty()?;
        let mut entities = Vec::with_capacity(grants.len());
        for grant in grants {
            let grantee = EntityUid::from_type_name_and_id(
                engine.grantee_type.clone(),
                EntityId::new(&grant.grantee),
            );
            let permissions = grant.permissions.iter().map(|p| {
                RestrictedExpression::new_entity_uid(engine.actions[action_index(*p)].clone())
            });
            let attrs = HashMap::from([
                (
                    "grantee".to_owned(),
                    RestrictedExpression::new_entity_uid(grantee),
                ),
                (
                    "subject".to_owned(),
                    RestrictedExpression::new_string(grant.subject.clone()),
                ),
                (
                    "status".to_owned(),
                    RestrictedExpression::new_string(grant.status.name().to_owned()),
                ),
                (
                    "not_before".to_owned(),
                    RestrictedExpression::new_long(grant.not_before),
                ),
                (
                    "expires_at".to_owned(),
                    RestrictedExpression::new_long(grant.expires_at),
                ),
                ("datasets".to_owned(), strings(&grant.datasets)),
                ("operations".to_owned(), strings(&grant.actions)),
                ("purposes".to_owned(), strings(&grant.purposes)),
                (
                    "permissions".to_owned(),
                    RestrictedExpression::new_set(permissions),
                ),
            ]);
            entities.push(Entity::new(
                engine.grant_uid(&grant.id),
                attrs,
                HashSet::new(),
            )?);
        }
        engine.entities = Entities::from_entities(entities, None)?;
        Ok(engine)
    }

    /// The same store from Cedar's JSON entity format
    /// (`Entities::from_json_value`), as a deployment that ships entities as
    /// JSON would load it. Kept to compare load paths; slower than [`load`].
    ///
    /// [`load`]: CedarEngine::load
    pub fn load_json(grants: &[Grant]) -> anyhow::Result<Self> {
        let mut engine = Self::empty()?;
        let document: Vec<serde_json::Value> = grants
            .iter()
            .map(|grant| {
                let permissions: Vec<_> = grant
                    .permissions
                    .iter()
                    .map(|p| json!({"__entity": {"type": "Action", "id": p.as_str()}}))
                    .collect();
                json!({
                    "uid": {"type": "Grant", "id": grant.id},
                    "attrs": {
                        "grantee": {"__entity": {"type": "Grantee", "id": grant.grantee}},
                        "subject": grant.subject,
                        "status": grant.status.name(),
                        "not_before": grant.not_before,
                        "expires_at": grant.expires_at,
                        "datasets": grant.datasets,
                        "operations": grant.actions,
                        "purposes": grant.purposes,
                        "permissions": permissions,
                    },
                    "parents": [],
                })
            })
            .collect();
        engine.entities = Entities::from_json_value(serde_json::Value::Array(document), None)?;
        Ok(engine)
    }

    pub fn len(&self) -> usize {
        self.entities.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.entities.iter().next().is_none()
    }

    /// Cedar's full answer for `case` (decision and diagnostics).
    pub fn response(&self, case: &Case) -> anyhow::Result<cedar_policy::Response> {
        let principal = EntityUid::from_type_name_and_id(
            self.grantee_type.clone(),
            EntityId::new(&case.caller),
        );
        let context = Context::from_pairs([
            ("now".to_owned(), RestrictedExpression::new_long(case.now)),
            (
                "subject".to_owned(),
                RestrictedExpression::new_string(case.subject.clone()),
            ),
            (
                "dataset".to_owned(),
                RestrictedExpression::new_string(case.dataset.clone()),
            ),
            (
                "operation".to_owned(),
                RestrictedExpression::new_string(case.action.clone()),
            ),
            (
                "purpose".to_owned(),
                RestrictedExpression::new_string(case.purpose.clone()),
            ),
        ])?;
        let request = Request::new(
            principal,
            self.actions[action_index(case.permission)].clone(),
            self.grant_uid(&case.grant_id),
            context,
            None,
        )?;
        Ok(self
            .authorizer
            .is_authorized(&request, &self.policies, &self.entities))
    }
}

impl Engine for CedarEngine {
    fn name(&self) -> &'static str {
        "cedar"
    }

    fn allows(&self, case: &Case) -> bool {
        // A request Cedar cannot even build is denied, as a deployment would.
        self.response(case)
            .is_ok_and(|response| response.decision() == Decision::Allow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{cases, grants};

    #[test]
    fn both_load_paths_hold_every_grant_and_agree() {
        let set = grants(300);
        let (fast, json) = (
            CedarEngine::load(&set).unwrap(),
            CedarEngine::load_json(&set).unwrap(),
        );
        assert_eq!((fast.len(), json.len()), (300, 300));
        assert!(fast.entities.deep_eq(&json.entities));
        crate::engines::check_agreement(&[&fast, &json], &cases(&set)).unwrap();
    }

    #[test]
    fn an_unknown_grant_is_denied_by_an_evaluation_error() {
        let set = grants(1);
        let engine = CedarEngine::load(&set).unwrap();
        let case = cases(&set)
            .into_iter()
            .find(|c| c.name == "deny: unknown grant")
            .unwrap();
        let response = engine.response(&case).unwrap();
        assert_eq!(response.decision(), Decision::Deny);
        assert_eq!(response.diagnostics().errors().count(), 1);
    }
}
