"""Runtime drivers: how a node runs an instance. ``base`` holds the one small interface every
driver implements; ``process`` runs the deployment's command as a process (in its own network
namespace as root). Later drivers (QEMU microVM, Firecracker) implement the same interface."""
