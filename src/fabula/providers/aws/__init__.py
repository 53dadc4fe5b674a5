"""`provider: aws`: the seed's own platform. The Cloud context (cloud.py), the network and
security groups (network.py), the load balancer (loadbalancer.py), the web group (group.py),
secrets (parameters.py), the team's state bucket (statebucket.py), all of it ensured in order
(controlplane.py) and removed (teardown.py); the fixed roles' instances (instances.py), reached
over the ssh transport (access.py, hostkeys.py); the provider itself (provider.py) with the ALB and
the Auto Scaling group as fabula's LoadBalancer and WebGroup (web.py) and the bucket as the
team's shared store (store.py)."""
from fabula.providers.aws.provider import AwsProvider

__all__ = ["AwsProvider"]
