"""The web group behind the WebGroup interface (providers/base.py): the provider's own group if
it has one (an Auto Scaling group on AWS), else ManagedWebGroup, fabula's own autoscaler's group
made of the functions the commands used directly until now."""
from __future__ import annotations

from fabula.autoscaling.actions import scale, scale_native
from fabula.autoscaling.policy import current_desired
from fabula.context import Context
from fabula.deploy.group import web_names
from fabula.providers.base import WebGroup


class ManagedWebGroup(WebGroup):
    """The group fabula keeps itself: the state's web servers, the load balancer's health."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def desired(self) -> int:
        return current_desired(self.ctx)

    def set_desired(self, count: int) -> dict:
        return scale(self.ctx, count)

    def members(self) -> list[str]:
        return web_names(self.ctx)

    def health(self) -> dict[str, str]:
        # as `describe` reads it: the load balancer's view, of the group's members only (a
        # backend the state no longer has is not one)
        health = self.ctx.provider.load_balancer.health()
        return {name: health[name] for name in self.members() if name in health}

    def release(self) -> str | None:
        return self.ctx.state.release


def web_group(ctx: Context) -> WebGroup:
    return ctx.provider.web_group(ctx) or ManagedWebGroup(ctx)


def set_desired(ctx: Context, count: int) -> dict:
    """`fabula scale`: the group's desired count set and reached, its new servers in service."""
    group = ctx.provider.web_group(ctx)
    if group is None:
        return ManagedWebGroup(ctx).set_desired(count)
    return scale_native(ctx, group, count)
