#!/bin/bash
# The seed script that release-tasks replaces, as people write it today. The benchmark runs it with
# every gate off, and with all three on and a stub `bundle` (exits 0) first on PATH, against the
# repository's release.toml, which has the same three tasks and gates.

echo "Running Release Tasks"

if [ "$RUN_MIGRATIONS_DURING_RELEASE" == "true" ]; then
  echo "Running Migrations"
  bundle exec rails db:migrate
fi

if [ "$SEED_DB_DURING_RELEASE" == "true" ]; then
  echo "Seeding DB"
  bundle exec rails db:seed
fi

if [ "$CLEAR_CACHE_DURING_RELEASE" == "true" ]; then
  echo "Clearing Rails Cache"
  bundle exec rails r "Rails.cache.clear"
fi

echo "Done running release-tasks.sh"
