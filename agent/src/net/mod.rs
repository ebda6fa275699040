//! Pod networking through netlink: netns, veth, addresses, routes, IPAM.
