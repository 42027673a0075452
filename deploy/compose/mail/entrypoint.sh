#!/bin/sh
# Postfix in the background (its master daemon), Dovecot in the foreground;
# both log to the container's output.
set -e
postfix start
exec dovecot -F
