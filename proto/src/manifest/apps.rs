//! Checks and defaults of the `apps/v1` workloads (`ReplicaSet`, Deployment,
//! `DaemonSet`): replica counts, update strategies, the selector and the pod
//! template (checked as a Pod spec, with its paths below `spec.template`).

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, Deployment, DeploymentSpec,
    DeploymentStrategy, ReplicaSet, ReplicaSetSpec, RollingUpdateDaemonSet,
    RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::ManifestError;
use super::check::{Checker, Scope, one_of, selector_matches};
use super::pod::{Mode, check_spec};

const DEFAULT_REPLICAS: i32 = 1;
const DEFAULT_REVISION_HISTORY: i32 = 10;
const DEFAULT_PROGRESS_DEADLINE: i32 = 600;
const DEFAULT_DEPLOYMENT_SURGE: &str = "25%";
const DEFAULT_DEPLOYMENT_UNAVAILABLE: &str = "25%";
const DEFAULT_DAEMON_SET_UNAVAILABLE: i32 = 1;
const DEPLOYMENT_STRATEGIES: [&str; 2] = ["RollingUpdate", "Recreate"];
const DAEMON_SET_STRATEGIES: [&str; 2] = ["RollingUpdate", "OnDelete"];

/// Checks and defaults a `ReplicaSet`.
pub(super) fn replica_set(c: &mut Checker<'_>, rs: &mut ReplicaSet) -> Result<(), ManifestError> {
    c.object_meta(&mut rs.metadata, Scope::Namespaced)?;
    let spec: &mut ReplicaSetSpec = &mut rs.spec;
    non_negative(c, "spec.replicas", &mut spec.replicas, DEFAULT_REPLICAS)?;
    non_negative(c, "spec.minReadySeconds", &mut spec.min_ready_seconds, 0)?;
    let template = spec
        .template
        .as_mut()
        .ok_or_else(|| c.err("spec.template", "required"))?;
    selector_and_template(c, &spec.selector, template)
}

/// Checks and defaults a Deployment.
pub(super) fn deployment(c: &mut Checker<'_>, d: &mut Deployment) -> Result<(), ManifestError> {
    c.object_meta(&mut d.metadata, Scope::Namespaced)?;
    let spec: &mut DeploymentSpec = &mut d.spec;
    non_negative(c, "spec.replicas", &mut spec.replicas, DEFAULT_REPLICAS)?;
    non_negative(c, "spec.minReadySeconds", &mut spec.min_ready_seconds, 0)?;
    non_negative(
        c,
        "spec.revisionHistoryLimit",
        &mut spec.revision_history_limit,
        DEFAULT_REVISION_HISTORY,
    )?;
    let min_ready = spec.min_ready_seconds.unwrap_or_default();
    let deadline = *spec
        .progress_deadline_seconds
        .get_or_insert(DEFAULT_PROGRESS_DEADLINE);
    if deadline <= min_ready {
        return Err(c.err(
            "spec.progressDeadlineSeconds",
            format!("{deadline} must be greater than minReadySeconds ({min_ready})"),
        ));
    }
    deployment_strategy(c, spec.strategy.get_or_insert_with(Default::default))?;
    selector_and_template(c, &spec.selector, &mut spec.template)
}

/// Checks and defaults a `DaemonSet`.
pub(super) fn daemon_set(c: &mut Checker<'_>, ds: &mut DaemonSet) -> Result<(), ManifestError> {
    c.object_meta(&mut ds.metadata, Scope::Namespaced)?;
    let spec: &mut DaemonSetSpec = &mut ds.spec;
    non_negative(c, "spec.minReadySeconds", &mut spec.min_ready_seconds, 0)?;
    non_negative(
        c,
        "spec.revisionHistoryLimit",
        &mut spec.revision_history_limit,
        DEFAULT_REVISION_HISTORY,
    )?;
    daemon_set_strategy(c, spec.update_strategy.get_or_insert_with(Default::default))?;
    selector_and_template(c, &spec.selector, &mut spec.template)
}

/// Defaults an unset count; refuses a negative one.
fn non_negative(
    c: &Checker<'_>,
    field: &str,
    value: &mut Option<i32>,
    default: i32,
) -> Result<(), ManifestError> {
    match *value {
        None => *value = Some(default),
        Some(n) if n < 0 => {
            return Err(c.err(field, format!("{n} must be greater than or equal to 0")));
        }
        Some(_) => {}
    }
    Ok(())
}

fn deployment_strategy(
    c: &Checker<'_>,
    strategy: &mut DeploymentStrategy,
) -> Result<(), ManifestError> {
    let kind = strategy
        .type_
        .get_or_insert_with(|| "RollingUpdate".to_owned());
    one_of(kind, &DEPLOYMENT_STRATEGIES).map_err(|r| c.err("spec.strategy.type", r))?;
    if kind == "Recreate" {
        if strategy.rolling_update.is_some() {
            return Err(c.err(
                "spec.strategy.rollingUpdate",
                "may not be specified when strategy type is Recreate",
            ));
        }
        return Ok(());
    }
    let ru = strategy
        .rolling_update
        .get_or_insert_with(RollingUpdateDeployment::default);
    let surge = ru
        .max_surge
        .get_or_insert_with(|| IntOrString::String(DEFAULT_DEPLOYMENT_SURGE.to_owned()));
    let surge_zero = int_or_percent(c, "spec.strategy.rollingUpdate.maxSurge", surge, false)?;
    let unavailable = ru
        .max_unavailable
        .get_or_insert_with(|| IntOrString::String(DEFAULT_DEPLOYMENT_UNAVAILABLE.to_owned()));
    let unavailable_zero = int_or_percent(
        c,
        "spec.strategy.rollingUpdate.maxUnavailable",
        unavailable,
        true,
    )?;
    if surge_zero && unavailable_zero {
        return Err(c.err(
            "spec.strategy.rollingUpdate.maxUnavailable",
            "may not be 0 when maxSurge is 0",
        ));
    }
    Ok(())
}

fn daemon_set_strategy(
    c: &Checker<'_>,
    strategy: &mut DaemonSetUpdateStrategy,
) -> Result<(), ManifestError> {
    let kind = strategy
        .type_
        .get_or_insert_with(|| "RollingUpdate".to_owned());
    one_of(kind, &DAEMON_SET_STRATEGIES).map_err(|r| c.err("spec.updateStrategy.type", r))?;
    if kind == "OnDelete" {
        if strategy.rolling_update.is_some() {
            return Err(c.err(
                "spec.updateStrategy.rollingUpdate",
                "may not be specified when strategy type is OnDelete",
            ));
        }
        return Ok(());
    }
    let ru = strategy
        .rolling_update
        .get_or_insert_with(RollingUpdateDaemonSet::default);
    let unavailable = ru
        .max_unavailable
        .get_or_insert(IntOrString::Int(DEFAULT_DAEMON_SET_UNAVAILABLE));
    let unavailable_zero = int_or_percent(
        c,
        "spec.updateStrategy.rollingUpdate.maxUnavailable",
        unavailable,
        true,
    )?;
    let surge = ru.max_surge.get_or_insert(IntOrString::Int(0));
    let surge_zero = int_or_percent(
        c,
        "spec.updateStrategy.rollingUpdate.maxSurge",
        surge,
        false,
    )?;
    if surge_zero && unavailable_zero {
        return Err(c.err(
            "spec.updateStrategy.rollingUpdate.maxUnavailable",
            "may not be 0 when maxSurge is 0",
        ));
    }
    Ok(())
}

/// Checks a count (>= 0) or a percentage (`"25%"`, at most 100% if
/// `at_most_all`); returns whether it is zero.
fn int_or_percent(
    c: &Checker<'_>,
    field: &str,
    value: &IntOrString,
    at_most_all: bool,
) -> Result<bool, ManifestError> {
    match value {
        IntOrString::Int(n) if *n < 0 => {
            Err(c.err(field, format!("{n} must be greater than or equal to 0")))
        }
        IntOrString::Int(n) => Ok(*n == 0),
        IntOrString::String(s) => {
            let percent = s
                .strip_suffix('%')
                .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|d| d.parse::<u64>().ok())
                .ok_or_else(|| {
                    c.err(
                        field,
                        format!("{s:?} must be an integer or a percentage such as \"25%\""),
                    )
                })?;
            if at_most_all && percent > 100 {
                return Err(c.err(field, format!("{s:?} must not be greater than 100%")));
            }
            Ok(percent == 0)
        }
    }
}

/// The selector (required, non-empty) must select the template's labels;
/// the template is checked as a Pod spec whose restartPolicy is Always.
fn selector_and_template(
    c: &mut Checker<'_>,
    selector: &LabelSelector,
    template: &mut PodTemplateSpec,
) -> Result<(), ManifestError> {
    c.label_selector("spec.selector", selector, false)?;
    let meta = template.metadata.get_or_insert_with(Default::default);
    c.labels("spec.template.metadata", meta)?;
    let labels = meta.labels.clone().unwrap_or_default();
    if !selector_matches(selector, &labels) {
        return Err(c.err(
            "spec.template.metadata.labels",
            "selector does not match template labels",
        ));
    }
    let spec = template
        .spec
        .as_mut()
        .ok_or_else(|| c.err("spec.template.spec", "required"))?;
    check_spec(c, "spec.template.spec", spec, Mode::Cluster)?;
    match spec.restart_policy.as_deref() {
        Some("Always") | None => Ok(()),
        Some(other) => Err(c.err(
            "spec.template.spec.restartPolicy",
            format!("unsupported value {other:?}: must be \"Always\" for a workload's pods"),
        )),
    }
}
