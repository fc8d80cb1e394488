"""Deployment: Envoy configuration (deploy.envoy) and Kubernetes manifests (deploy.k8s), rendered from Python."""
