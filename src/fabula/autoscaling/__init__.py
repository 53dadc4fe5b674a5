"""The web tier as an autoscaling group (FabulAWS's autoscaling group, kept by fabula itself).

The group has a desired count of web servers within `autoscaling: {min, max}` of fabula.yml,
and a launch configuration: the group's release (`state.release`). `fabula scale` sets the
desired count; the autoscaler (a long-running program of the environment) changes it from the
demand the load balancer measures, and replaces web servers that stop passing their health
check.

    policy      the group's settings, the decision, the demand meter, the health tracker (no I/O)
    log         the decisions log and the status file
    actions     the group's changes, each an operation (the lock, a history record)
    group       the group behind the WebGroup interface: the provider's own, else these modules'
    controller  the autoscaler program's loop, and its installation under the platform's supervisor
    report      the group as `fabula describe` reports it (data; the CLI renders it)

It sits above deploy/ (whose group primitives it uses) and environment/, below operations/ and
the CLI, which import it.
"""
