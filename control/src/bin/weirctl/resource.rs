//! The resource types weirctl knows, as typed on the command line
//! (`pods`, `po`, `deploy`, `deployment/web`…) and as printed
//! (`deployment.apps/web`).

use anyhow::bail;

/// One kind the API serves, with kubectl's names for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Pod,
    Deployment,
    ReplicaSet,
    DaemonSet,
    Node,
    Namespace,
    Event,
    Service,
    EndpointSlice,
    NetworkPolicy,
    HorizontalPodAutoscaler,
}

impl Resource {
    /// Looks a resource type up by any of kubectl's spellings.
    pub fn parse(arg: &str) -> anyhow::Result<Self> {
        let lower = arg.to_ascii_lowercase();
        // `deployments.apps` and `deployment.apps/v1` name the same thing.
        let base = lower.split('.').next().unwrap_or_default();
        Ok(match base {
            "po" | "pod" | "pods" => Self::Pod,
            "deploy" | "deployment" | "deployments" => Self::Deployment,
            "rs" | "replicaset" | "replicasets" => Self::ReplicaSet,
            "ds" | "daemonset" | "daemonsets" => Self::DaemonSet,
            "no" | "node" | "nodes" => Self::Node,
            "ns" | "namespace" | "namespaces" => Self::Namespace,
            "ev" | "event" | "events" => Self::Event,
            "svc" | "service" | "services" => Self::Service,
            "endpointslice" | "endpointslices" => Self::EndpointSlice,
            "netpol" | "networkpolicy" | "networkpolicies" => Self::NetworkPolicy,
            "hpa" | "horizontalpodautoscaler" | "horizontalpodautoscalers" => {
                Self::HorizontalPodAutoscaler
            }
            _ => bail!("the server doesn't have a resource type \"{arg}\""),
        })
    }

    /// The resource of an API `kind` field.
    pub fn from_kind(kind: &str) -> Option<Self> {
        Some(match kind {
            "Pod" => Self::Pod,
            "Deployment" => Self::Deployment,
            "ReplicaSet" => Self::ReplicaSet,
            "DaemonSet" => Self::DaemonSet,
            "Node" => Self::Node,
            "Namespace" => Self::Namespace,
            "Event" => Self::Event,
            "Service" => Self::Service,
            "EndpointSlice" => Self::EndpointSlice,
            "NetworkPolicy" => Self::NetworkPolicy,
            "HorizontalPodAutoscaler" => Self::HorizontalPodAutoscaler,
            _ => return None,
        })
    }

    /// The `kind` field.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Pod => "Pod",
            Self::Deployment => "Deployment",
            Self::ReplicaSet => "ReplicaSet",
            Self::DaemonSet => "DaemonSet",
            Self::Node => "Node",
            Self::Namespace => "Namespace",
            Self::Event => "Event",
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::NetworkPolicy => "NetworkPolicy",
            Self::HorizontalPodAutoscaler => "HorizontalPodAutoscaler",
        }
    }

    /// The `apiVersion` field.
    pub fn api_version(self) -> &'static str {
        match self {
            Self::Deployment | Self::ReplicaSet | Self::DaemonSet => "apps/v1",
            Self::EndpointSlice => "discovery.k8s.io/v1",
            Self::NetworkPolicy => "networking.k8s.io/v1",
            Self::HorizontalPodAutoscaler => "autoscaling/v2",
            Self::Pod | Self::Node | Self::Namespace | Self::Event | Self::Service => "v1",
        }
    }

    /// The lower-case plural, as in the server's messages (`pods "x" not found`).
    pub fn plural(self) -> &'static str {
        match self {
            Self::Pod => "pods",
            Self::Deployment => "deployments",
            Self::ReplicaSet => "replicasets",
            Self::DaemonSet => "daemonsets",
            Self::Node => "nodes",
            Self::Namespace => "namespaces",
            Self::Event => "events",
            Self::Service => "services",
            Self::EndpointSlice => "endpointslices",
            Self::NetworkPolicy => "networkpolicies",
            Self::HorizontalPodAutoscaler => "horizontalpodautoscalers",
        }
    }

    /// kubectl's group-qualified singular: `pod`, `deployment.apps`.
    pub fn qualified(self) -> &'static str {
        match self {
            Self::Pod => "pod",
            Self::Deployment => "deployment.apps",
            Self::ReplicaSet => "replicaset.apps",
            Self::DaemonSet => "daemonset.apps",
            Self::Node => "node",
            Self::Namespace => "namespace",
            Self::Event => "event",
            Self::Service => "service",
            Self::EndpointSlice => "endpointslice.discovery.k8s.io",
            Self::NetworkPolicy => "networkpolicy.networking.k8s.io",
            Self::HorizontalPodAutoscaler => "horizontalpodautoscaler.autoscaling",
        }
    }

    /// Whether objects of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Self::Node | Self::Namespace)
    }
}

/// Splits `kind/name` (or `kind` with names following) into a resource and
/// its names: `get deploy web api`, `get deploy/web`, `rollout status deployment/web`.
pub fn targets(args: &[String]) -> anyhow::Result<Vec<(Resource, Option<String>)>> {
    let Some(first) = args.first() else {
        bail!("you must specify the type of resource to get");
    };
    if first.contains('/') {
        return args
            .iter()
            .map(|a| match a.split_once('/') {
                Some((kind, name)) if !name.is_empty() => {
                    Ok((Resource::parse(kind)?, Some(name.to_owned())))
                }
                _ => bail!(
                    "there is no need to specify a resource type as a separate argument when passing arguments in resource/name form (e.g. 'weirctl get resource/<resource_name>' instead of 'weirctl get resource resource/<resource_name>'"
                ),
            })
            .collect();
    }
    let kinds: Vec<Resource> = first
        .split(',')
        .map(Resource::parse)
        .collect::<anyhow::Result<_>>()?;
    let names = &args[1..];
    if names.is_empty() {
        return Ok(kinds.into_iter().map(|k| (k, None)).collect());
    }
    if kinds.len() > 1 {
        bail!("names can only be given with one resource type");
    }
    Ok(names.iter().map(|n| (kinds[0], Some(n.clone()))).collect())
}

/// `kind/name` or `kind name` as one (resource, name), for commands that act
/// on one object (`scale`, `rollout`).
pub fn one_target(args: &[String], verb: &str) -> anyhow::Result<(Resource, String)> {
    let mut found = targets(args)?;
    match (found.len(), found.pop()) {
        (1, Some((r, Some(name)))) => Ok((r, name)),
        _ => bail!("{verb} needs exactly one resource and name, e.g. deployment/web"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectl_spellings_resolve() {
        for (arg, r) in [
            ("po", Resource::Pod),
            ("Pods", Resource::Pod),
            ("deploy", Resource::Deployment),
            ("deployments.apps", Resource::Deployment),
            ("rs", Resource::ReplicaSet),
            ("ds", Resource::DaemonSet),
            ("no", Resource::Node),
            ("ns", Resource::Namespace),
            ("ev", Resource::Event),
            ("svc", Resource::Service),
            ("services", Resource::Service),
            ("endpointslice", Resource::EndpointSlice),
            ("endpointslices.discovery.k8s.io", Resource::EndpointSlice),
            ("netpol", Resource::NetworkPolicy),
            ("networkpolicy", Resource::NetworkPolicy),
            ("NetworkPolicies", Resource::NetworkPolicy),
            ("networkpolicies.networking.k8s.io", Resource::NetworkPolicy),
            ("hpa", Resource::HorizontalPodAutoscaler),
            (
                "horizontalpodautoscalers.autoscaling",
                Resource::HorizontalPodAutoscaler,
            ),
        ] {
            assert_eq!(Resource::parse(arg).expect(arg), r);
        }
        let err = Resource::parse("widgets").expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "the server doesn't have a resource type \"widgets\""
        );
    }

    #[test]
    fn targets_accept_kind_name_and_slash_forms() {
        let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let t = targets(&s(&["deploy", "a", "b"])).expect("names");
        assert_eq!(
            t,
            vec![
                (Resource::Deployment, Some("a".to_owned())),
                (Resource::Deployment, Some("b".to_owned()))
            ]
        );
        let t = targets(&s(&["deployment/web", "po/x"])).expect("slash");
        assert_eq!(t[1], (Resource::Pod, Some("x".to_owned())));
        let t = targets(&s(&["pods,rs"])).expect("list");
        assert_eq!(t, vec![(Resource::Pod, None), (Resource::ReplicaSet, None)]);
        assert!(targets(&s(&["deploy/web", "x"])).is_err());
        assert_eq!(
            one_target(&s(&["deployment/web"]), "scale").expect("one"),
            (Resource::Deployment, "web".to_owned())
        );
    }
}
