#!/bin/bash
# The seed script that release-tasks replaces (../shared/seeds/003_*), as people write it today; the
# benchmark runs it with every gate off, and with `bundle exec ...` replaced by /bin/true.

echo "Running Release Tasks"

if [ "$RUN_MIGRATIONS_DURING_RELEASE" == "true" ]; then
  echo "Running Migrations"
  ${RAILS_CMD:-bundle exec rails} db:migrate
fi

if [ "$SEED_DB_DURING_RELEASE" == "true" ]; then
  echo "Seeding DB"
  ${RAILS_CMD:-bundle exec rails} db:seed
fi

if [ "$CLEAR_CACHE_DURING_RELEASE" == "true" ]; then
  echo "Clearing Rails Cache"
  ${RAILS_CMD:-bundle exec rails} r "Rails.cache.clear"
fi

echo "Done running release-tasks.sh"
