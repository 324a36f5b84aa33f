"""What the web service and the consumers share: settings, Redis keys, the job envelope,
queue operations and connections. Nothing here imports Quart, so a consumer process never
builds the web app to get at its queues."""
