"""`provider: aws`: the seed's own platform. This package holds the control plane so far: the
Cloud context (cloud.py), the network and security groups (network.py), the load balancer
(loadbalancer.py), the web group (group.py), secrets (parameters.py), the team's state bucket
(statebucket.py), all of it ensured in order (controlplane.py) and removed (teardown.py).
The provider itself (instances over the ssh transport) is not wired yet."""
