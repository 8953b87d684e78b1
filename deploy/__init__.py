"""Set-up of the platform's local infrastructure: the private TimescaleDB
cluster, the Mosquitto broker, the development certificate authority and the
numbered SQL migrations. The shell script ``setup-system.sh`` beside this file
installs what these need from Debian (the Makefile runs it)."""
