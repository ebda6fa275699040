//! Small netlink queries shared by the node side and the pod side.

use futures::TryStreamExt;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::Handle;

use super::error::netlink_errno;

/// The link called `name`, if there is one.
pub(crate) async fn by_name(
    handle: &Handle,
    name: &str,
) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    match handle
        .link()
        .get()
        .match_name(name)
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The link with index `index`, if there is one.
pub(crate) async fn by_index(
    handle: &Handle,
    index: u32,
) -> Result<Option<LinkMessage>, rtnetlink::Error> {
    match handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
    {
        Ok(link) => Ok(link),
        Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Deletes link `index`; already gone is success.
pub(crate) async fn delete(handle: &Handle, index: u32) -> Result<(), rtnetlink::Error> {
    match handle.link().del(index).execute().await {
        Err(e) if netlink_errno(&e) != Some(libc::ENODEV) => Err(e),
        _ => Ok(()),
    }
}

/// For a veth: the peer's ifindex (in the peer's netns).
pub(crate) fn peer_index(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Link(index) => Some(*index),
        _ => None,
    })
}

/// The link's MTU.
pub(crate) fn mtu(link: &LinkMessage) -> Option<u32> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(mtu) => Some(*mtu),
        _ => None,
    })
}

/// Treats the given errno replies (e.g. `EEXIST` on an add) as success.
pub(crate) fn ignoring(
    result: Result<(), rtnetlink::Error>,
    errnos: &[i32],
) -> Result<(), rtnetlink::Error> {
    match result {
        Err(e) if netlink_errno(&e).is_some_and(|n| errnos.contains(&n)) => Ok(()),
        other => other,
    }
}
