//! The agent's half: lets aya read and write these types in maps.

use crate::{
    config::DatapathConfig,
    counters::Counter,
    flow::{FlowKey, InboundFlow, SteeredFlow},
    gateway::{
        GatewayGroup, GatewayHealth, GatewayTraffic, PortBlock, PortBlockKey, PortBlockOwner,
        Probe, ProbeReply,
    },
    nat::{NatForward, NatReverse},
    nodes::{ClusterCidr, EgressIp, LocalPod, NodeInfo},
    policy::{PolicyKey, PolicyValue},
};

macro_rules! impl_pod {
    ($($ty:ty),+ $(,)?) => {
        // SAFETY: each type is `#[repr(C)]`, made only of integers and byte arrays, with
        // explicit padding fields, so every bit pattern is valid.
        $(unsafe impl aya::Pod for $ty {})+
    };
}

impl_pod!(
    DatapathConfig,
    Counter,
    FlowKey,
    InboundFlow,
    SteeredFlow,
    NatForward,
    NatReverse,
    ClusterCidr,
    EgressIp,
    LocalPod,
    NodeInfo,
    PolicyKey,
    PolicyValue,
    GatewayGroup,
    GatewayHealth,
    GatewayTraffic,
    Probe,
    ProbeReply,
    PortBlock,
    PortBlockKey,
    PortBlockOwner,
);
