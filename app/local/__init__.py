"""Running the whole stack on one machine: ``autonomy up`` (child processes under a
supervisor), the embedded ``redis-server``, and the demo fleet ``make run`` starts."""
